#!/usr/bin/env bash
# Nsight Compute profiles of the Hopper kernel, one per precision (bench/ncu_hopper_call.py's second call):
# every section of `--set full` (pipe utilisation, warp stall reasons, source counters) as text, plus the
# per-instruction SASS table (stall samples per instruction) as CSV where this ncu can print it.
#
#   OUT=/tmp/ncu bash bench/ncu_hopper.sh exact,int8_qk,fp8 [ncu_hopper_call.py options]
#
# Files in $OUT: ncu_<precision>.txt (details), ncu_<precision>_sass.csv (source page), ncu_<precision>.ncu-rep.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT="${OUT:-$PWD/bench_out}"
mkdir -p "$OUT"
precisions="${1:-exact,int8_qk,fp8}"
shift || true
status=0
for precision in ${precisions//,/ }; do
  rep="$OUT/ncu_$precision"
  ncu --set full --clock-control none -k regex:hopper --launch-skip 1 --launch-count 1 -f -o "$rep" \
    python3 bench/ncu_hopper_call.py "$precision" "$@" > "$rep.log" 2>&1 \
    || { status=1; tail -n 5 "$rep.log"; continue; }
  ncu --import "$rep.ncu-rep" --print-details all > "$rep.txt" 2>&1 \
    || ncu --import "$rep.ncu-rep" > "$rep.txt" 2>&1 || status=1
  ncu --import "$rep.ncu-rep" --page source --csv --print-source sass > "${rep}_sass.csv" 2>&1 \
    || rm -f "${rep}_sass.csv"
  echo "ncu $precision: $(grep -m1 -E 'Duration' "$rep.txt" | tr -s ' ')"
done
exit $status
