#!/usr/bin/env bash
# One device call: the Hopper kernel under two Triton releases (the machine's own and a `triton_bundle.sh`
# archive), this source against an older one (A/B in the same call), then this source's Hopper GPU tests under
# the bundled release.
#
#   bash bench/gpu_releases_ab.sh            (device tool: carry [".whl", ".tri", ".ab"], timeout_s 600)
#
# Environment (optional): BUNDLE (default .tri/triton-3.9.0-slim.tar.xz), OLD (a tree of the older source,
# e.g. `git archive REV | tar -x -C .ab/old`; default .ab/old), BUDGET (seconds for everything, default 560),
# TESTS_LIMIT (default 280), AB_RESERVE (seconds kept for the A/B runs after the tests, default 80),
# CASES (the new source's run_gpu cases, default anchor), AB_CASE (the A/B case, default wan-w4-t121).
# Files in $OUT: session.log, {new,old}{39,36}/attention_bench.json, gpu_tests_bundle.log.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT="${OUT:-$PWD/bench_out}"
mkdir -p "$OUT"
BUNDLE="${BUNDLE:-.tri/triton-3.9.0-slim.tar.xz}"
OLD="${OLD:-.ab/old}"
BUDGET="${BUDGET:-560}"
export PYTHONUNBUFFERED=1 LVSA_KERNELS_TRITON_AUTOTUNE=0  # the Hopper kernel's first config everywhere
say() { echo "[releases_ab +${SECONDS}s] $*"; }

main() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$PWD/.site" .whl/*.whl \
    && export PYTHONPATH="$PWD/.site" FLASHINFER_WORKSPACE_BASE="$PWD/.fiws" FLASHINFER_CUDA_ARCH_LIST=9.0a \
    || say "no FlashInfer wheels: its method is skipped"
  python3 -m pip install -q --no-deps --no-build-isolation . || { say "ERROR: pip install . failed"; return 1; }
  python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/old-site "$OLD" \
    || { say "ERROR: pip install $OLD failed"; return 1; }
  local bundle_env
  bundle_env=$(bash bench/triton_bundle.sh unpack "$BUNDLE" /tmp/triton-bundle) || { say "ERROR: unpack"; return 1; }
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv || true

  bench() {  # tag, release (bundle|machine), source (new|old), cases, methods
    local tag=$1 release=$2 src=$3 cases=$4 methods=$5 script=bench/run_gpu.py
    [[ " ${SKIP:-} " == *" $tag "* ]] && return
    (
      [[ $release == bundle ]] && eval "$bundle_env"
      [[ $src == old ]] && { export PYTHONPATH="/tmp/old-site:$PYTHONPATH"; script="$OLD/bench/run_gpu.py"; }
      say "$tag: $src source, Triton $(python3 -c 'import triton; print(triton.__version__)'), $cases, $methods"
      timeout -k 10 $(( BUDGET - SECONDS > 30 ? BUDGET - SECONDS : 30 )) python3 "$script" --out "$OUT/$tag" \
        --cases "$cases" --methods "$methods" --ref-stride 4 | grep -v "^\[" | tail -n 16
    )
  }
  bench new39 bundle new "${CASES:-anchor}" dense_cudnn,flashinfer,triton
  bench new36 machine new "${CASES:-anchor}" dense_cudnn,flashinfer,triton
  local lim=$(( BUDGET - SECONDS - ${AB_RESERVE:-80} )); (( lim > ${TESTS_LIMIT:-280} )) && lim=${TESTS_LIMIT:-280}
  if (( lim > 60 )); then
    say "Hopper GPU tests under the bundled Triton (limit ${lim}s)"
    ( eval "$bundle_env"; timeout -k 10 "$lim" python3 -m pytest -q -rs -p no:cacheprovider \
        tests/test_hopper_kernel.py tests/test_fp8.py > "$OUT/gpu_tests_bundle.log" 2>&1 )
    tail -n 8 "$OUT/gpu_tests_bundle.log"
  else
    say "Hopper GPU tests skipped: ${lim}s left"
  fi
  bench old39 bundle old "${AB_CASE:-wan-w4-t121}" flashinfer,triton
  bench old36 machine old "${AB_CASE:-wan-w4-t121}" flashinfer,triton
  say "done; files: $(cd "$OUT" && find . -type f | tr '\n' ' ')"
}

main 2>&1 | tee "$OUT/session.log"
