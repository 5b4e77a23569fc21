#!/usr/bin/env bash
# The prepared GPU session (about 8 minutes on one H100): the test suite's GPU checks in fp32/bf16/fp16, then
# every benchmark with --device cuda, then one table of every step (status, seconds) and every target line
# (PASS/MISS, measured vs goal). Logs go to OUT/<step>.log, the table to OUT/table.txt (OUT: --out, default
# bench-gpu-<UTC time>). Figures go into docs/performance.md ("On a GPU"), with the card and the date.
#
#   bench/gpu.sh --dry-run      # print the commands it would run, run nothing
#   bench/gpu.sh                # run them (each step has its own time limit; a failed step does not stop the rest)
#   PYTHON=.venv/bin/python bench/gpu.sh --out /tmp/gpu
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

DRY=0
OUT="bench-gpu-$(date -u +%Y%m%d-%H%M)"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) [ $# -ge 2 ] || { echo "bench/gpu.sh: --out needs a folder" >&2; exit 2; }; OUT=$2; shift ;;
        -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench/gpu.sh: unknown option '$1' (expected --dry-run, --out DIR, --help)" >&2; exit 2 ;;
    esac
    shift
done
PY=${PYTHON:-python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

# name | time limit (s) | command — sized so the whole session stays under 8 minutes on an H100
STEPS=(
    "tests|100|$PY -m pytest -q -m gpu tests/test_gpu.py"
    "encoder|60|$PY -m bench.encoder --device cuda --dtype float16 --full --repeats 5"
    "encoder-real|40|$PY -m bench.encoder --device cuda --dtype float16 --real --image-size 448 --repeats 5"
    "vtu_prefill|60|$PY -m bench.vtu_prefill --device cuda --dtype bfloat16 --layers 8 --merged 90 195 394 --repeats 5"
    "e2e_llava|70|$PY -m bench.e2e_llava --device cuda --dtype float16 --vision-layers 24 --text-layers 8 --new-tokens 32"
    "e2e_small_vlm|60|$PY -m bench.e2e_small_vlm --device cuda --questions 32 --batch 8"
    "onevision_crops|40|$PY -m bench.onevision_crops --device cuda --dtype bfloat16 --layers 26 --crops 10 --repeats 5"
    "qwen_tower|40|$PY -m bench.qwen_tower --device cuda --dtype bfloat16 --layers 32 --image-size 448 --repeats 5"
)

if [ "$DRY" = 1 ]; then
    for step in "${STEPS[@]}"; do
        IFS='|' read -r name limit cmd <<< "$step"
        echo "timeout ${limit} ${cmd}"
    done
    exit 0
fi

mkdir -p "$OUT"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"; } \
    > "$OUT/machine.txt"
ROWS=()
for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit cmd <<< "$step"
    echo "== $name: $cmd" >&2
    start=$(date +%s)
    # shellcheck disable=SC2086  # the command is a word list on purpose
    timeout "$limit" $cmd > "$OUT/$name.log" 2>&1
    rc=$?
    secs=$(( $(date +%s) - start ))
    case $rc in 0) status=ok ;; 124) status="timeout ${limit}s" ;; *) status="rc $rc" ;; esac
    ROWS+=("$name|$status|${secs}s|")
    # every target line of the bench: "[PASS] name: measured 1.23x (target >= 2x)"
    while IFS= read -r line; do
        ROWS+=("  $name|$(sed -E 's/^ *\[(PASS|MISS)\] (.*): measured ([^ ]+) \(target (.*)\)$/\1|\3|\2 (target \4)/' <<< "$line")")
    done < <(grep -E '^ *\[(PASS|MISS)\] ' "$OUT/$name.log")
    # the pytest summary line
    [ "$name" = tests ] && ROWS+=("  tests|$(grep -E '(passed|failed|skipped|error)' "$OUT/$name.log" | tail -1)||")
done

{
    cat "$OUT/machine.txt"
    printf '%-22s %-14s %-10s %s\n' step status/result figure what
    for row in "${ROWS[@]}"; do
        IFS='|' read -r a b c d <<< "$row"
        printf '%-22s %-14s %-10s %s\n' "$a" "$b" "$c" "$d"
    done
} | tee "$OUT/table.txt"
