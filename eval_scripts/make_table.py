#!/usr/bin/env python
"""The DyMU paper's table from lmms-eval result folders: score per benchmark, average % of the full model,
mean ± std visual tokens; markdown on stdout, --output PREFIX writes PREFIX.md and PREFIX.csv.

    python eval_scripts/make_table.py logs/llava15 --output logs/llava15/table --paper
    python eval_scripts/make_table.py --run full=logs/a --run DyMU-low=logs/b --benchmark POPE=pope:pope_accuracy,none:100

The logic lives in dymu.lmms_eval.table (no lmms-eval needed to run it).
"""

import sys

from dymu.lmms_eval.table import main

if __name__ == "__main__":
    sys.exit(main())
