import sys

from dymu.cli import main

sys.exit(main())
