#!/usr/bin/env bash
# One device-tool command: install, versions, the GPU tests, the kernel-config sweep, the attention benchmark,
# RESULTS.md + PNG, and the end-to-end step benchmark. Everything is logged to $OUT/session.log as well.
#
#   bash bench/gpu_session.sh                 (device tool: timeout_s 600, carry [".whl"] for FlashInfer)
#
# Environment (all optional):
#   STAGES          comma list of tests,sweep,backward,svoo,bench,train,e2e (run in this order; default tests,bench,e2e)
#   SESSION_BUDGET  seconds for the whole script, install included          (default 570)
#   TESTS_LIMIT     hard limit of the test stage, seconds                   (default 150)
#   TESTS_K         pytest -k expression for the test stage                 (default: the whole suite)
#   SWEEP_CASES, SWEEP_LIMIT   kernel_sweep.py --cases / hard limit, seconds (default all / 180)
#   E2E_LIMIT       hard limit of the e2e stage, seconds (reserved first)   (default 150)
#   BACKWARD_LIMIT, BACKWARD_ARGS   hard limit (default 240 s) / extra arguments of bench/backward_bench.py
#   SVOO_LIMIT, SVOO_ARGS           hard limit (default 180 s) / extra arguments of bench/svoo_bench.py
#   TRAIN_LIMIT, TRAIN_ARGS         hard limit (default 200 s) / extra arguments of bench/e2e_step.py --train
#   BENCH_CASES     run_gpu.py --cases                                      (default all)
#   BENCH_METHODS   run_gpu.py --methods                                    (default: run_gpu.py's list)
#   BENCH_TAIL      seconds kept free after the last bench case may start   (default 150: a T=121 case)
#   BENCH_ARGS, E2E_ARGS   extra arguments for run_gpu.py / e2e_step.py
#   TESTS_PATHS     test files or folders for the test stage                 (default tests)
#   TRITON_BUNDLE   an archive of `bench/triton_bundle.sh pack`: that Triton runs every stage (first on PYTHONPATH,
#                   the machine's CUDA tools as its ptxas); default: the machine's own Triton
#   WRITE_RESULTS=0 skip RESULTS.md + PNG (two runs in one call: fewer files back in $OUT)
#   SKIP_INSTALL=1  use the installed lvsa_kernels and site packages as they are (local dry runs)
# Files back in $OUT: session.log, gpu_tests.log, kernel_sweep.json, backward_bench.json, svoo_bench.json,
# attention_bench.json, RESULTS.md, speedup_vs_frames.png, e2e_train.json, e2e.json (each stage's own).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT="${OUT:-$PWD/bench_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
STAGES="${STAGES:-tests,bench,e2e}"
SESSION_BUDGET="${SESSION_BUDGET:-570}"
TESTS_LIMIT="${TESTS_LIMIT:-150}"
E2E_LIMIT="${E2E_LIMIT:-150}"
BENCH_TAIL="${BENCH_TAIL:-150}"

has_stage() { [[ ",$STAGES," == *",$1,"* ]]; }
left() { echo $(( SESSION_BUDGET - SECONDS )); }
say() { echo "[gpu_session +${SECONDS}s] $*"; }

main() {
  local status=0 rc
  say "stages=$STAGES budget=${SESSION_BUDGET}s out=$OUT"
  if [[ "${SKIP_INSTALL:-0}" == 1 ]]; then
    say "SKIP_INSTALL=1: using the installed packages"
  elif compgen -G ".whl/*.whl" > /dev/null; then
    if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$PWD/.site" .whl/*.whl; then
      export PYTHONPATH="$PWD/.site${PYTHONPATH:+:$PYTHONPATH}" FLASHINFER_WORKSPACE_BASE="$PWD/.fiws" \
             FLASHINFER_CUDA_ARCH_LIST=9.0a MAX_JOBS=16
      say "installed wheels: $(cd .whl && ls *.whl | tr '\n' ' ')"
    else
      say "WARNING: wheel install failed; FlashInfer methods will be skipped"; status=1
    fi
  else
    say "no .whl/ wheels: FlashInfer methods will be skipped"
  fi
  if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
    python3 -m pip install --no-deps --no-build-isolation . -q || { say "ERROR: pip install . failed"; return 1; }  # the image's old pip cannot do editable installs offline
  fi
  if [[ -n "${TRITON_BUNDLE:-}" ]]; then
    local exports
    exports=$(bash bench/triton_bundle.sh unpack "$TRITON_BUNDLE" "/tmp/triton-bundle-$(basename "$TRITON_BUNDLE" .tar.xz)") \
      || { say "ERROR: could not unpack $TRITON_BUNDLE"; return 1; }
    eval "$exports"
    say "Triton from $TRITON_BUNDLE: $exports"
  fi
  python3 - <<'EOF'
import importlib.metadata as md, torch, triton
def v(d):
    try: return md.version(d)
    except md.PackageNotFoundError: return "not installed"
print(f"python torch {torch.__version__} cuda {torch.version.cuda} cudnn {torch.backends.cudnn.version()} "
      f"triton {triton.__version__} flashinfer {v('flashinfer-python')} diffusers {v('diffusers')} "
      f"lvsa_kernels {v('lvsa_kernels')}; device {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
EOF
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
    --format=csv || true

  local e2e_reserve=0
  if has_stage e2e && [[ -f bench/e2e_step.py ]]; then e2e_reserve=$E2E_LIMIT; fi

  if has_stage tests; then
    local lim=$(( $(left) - e2e_reserve - 60 )); (( lim > TESTS_LIMIT )) && lim=$TESTS_LIMIT
    if (( lim > 20 )); then
      say "stage tests (limit ${lim}s): pytest -v -rs ${TESTS_PATHS:-tests} ${TESTS_K:+-k \"$TESTS_K\"}"
      timeout -k 10 "$lim" python3 -m pytest -v --durations=12 -rs -p no:cacheprovider ${TESTS_PATHS:-tests} ${TESTS_K:+-k "$TESTS_K"} \
        > "$OUT/gpu_tests.log" 2>&1; rc=$?
      tail -n 25 "$OUT/gpu_tests.log"
      say "stage tests rc=$rc"; (( rc != 0 )) && status=1
    else
      say "stage tests skipped: ${lim}s left for it"
    fi
  fi

  if has_stage sweep; then
    local lim=$(( $(left) - e2e_reserve - 60 )); (( lim > ${SWEEP_LIMIT:-180} )) && lim=${SWEEP_LIMIT:-180}
    if (( lim > 30 )); then
      say "stage sweep (limit ${lim}s): bench/kernel_sweep.py --cases ${SWEEP_CASES:-all}"
      timeout -k 10 "$lim" python3 bench/kernel_sweep.py --out "$OUT" --time-budget $(( lim - 60 )) \
        ${SWEEP_CASES:+--cases "$SWEEP_CASES"} ${SWEEP_ARGS:-} | tail -n 30; rc=${PIPESTATUS[0]}
      say "stage sweep rc=$rc"; (( rc != 0 )) && status=1
    else
      say "stage sweep skipped: ${lim}s left for it"
    fi
  fi

  local name script limit args
  for name in backward svoo; do
    has_stage "$name" || continue
    if [[ $name == backward ]]; then script=bench/backward_bench.py limit=${BACKWARD_LIMIT:-240} args=${BACKWARD_ARGS:-}
    else script=bench/svoo_bench.py limit=${SVOO_LIMIT:-180} args=${SVOO_ARGS:-}; fi
    local lim=$(( $(left) - e2e_reserve - 20 )); (( lim > limit )) && lim=$limit
    if (( lim > 30 )); then
      say "stage $name (limit ${lim}s): $script --out $OUT $args"
      timeout -k 10 "$lim" python3 "$script" --out "$OUT" $args; rc=$?
      say "stage $name rc=$rc"; (( rc != 0 )) && status=1
    else
      say "stage $name skipped: ${lim}s left for it"
    fi
  done

  if has_stage bench; then
    local hard=$(( $(left) - e2e_reserve - 20 ))
    local soft=$(( hard - BENCH_TAIL ))
    if (( soft > 30 )); then
      say "stage bench (time budget ${soft}s, hard limit ${hard}s)"
      timeout -k 10 "$hard" python3 bench/run_gpu.py --out "$OUT" --time-budget "$soft" \
        --cases "${BENCH_CASES:-all}" ${BENCH_METHODS:+--methods "$BENCH_METHODS"} ${BENCH_ARGS:-}; rc=$?
      say "stage bench rc=$rc"; (( rc != 0 )) && status=1
    else
      say "stage bench skipped: ${soft}s left for it"
    fi
    if [[ -f "$OUT/attention_bench.json" && "${WRITE_RESULTS:-1}" == 1 ]]; then
      [[ -f bench/RESULTS.md ]] && cp bench/RESULTS.md "$OUT/RESULTS.md"
      python3 bench/write_results.py --json "$OUT/attention_bench.json" --md "$OUT/RESULTS.md" \
        --png "$OUT/speedup_vs_frames.png" || status=1
    fi
  fi

  if has_stage train; then
    local lim=$(( $(left) - e2e_reserve - 10 )); (( lim > ${TRAIN_LIMIT:-200} )) && lim=${TRAIN_LIMIT:-200}
    if (( lim > 60 )); then
      say "stage train (limit ${lim}s): bench/e2e_step.py --train --time-budget $(( lim - 60 )) ${TRAIN_ARGS:-}"
      timeout -k 10 "$lim" python3 bench/e2e_step.py --train --json-out "$OUT/e2e_train.json" \
        --time-budget $(( lim - 60 )) ${TRAIN_ARGS:-}; rc=$?
      say "stage train rc=$rc"; (( rc != 0 )) && status=1
    else
      say "stage train skipped: ${lim}s left for it"
    fi
  fi

  if has_stage e2e; then
    if [[ -f bench/e2e_step.py ]]; then
      local lim=$(( $(left) - 5 )); (( lim > E2E_LIMIT )) && lim=$E2E_LIMIT
      local budget_arg=()
      grep -q -- "--time-budget" bench/e2e_step.py && budget_arg=(--time-budget $(( lim - 60 > 10 ? lim - 60 : 10 )))
      say "stage e2e (limit ${lim}s): bench/e2e_step.py ${budget_arg[*]} ${E2E_ARGS:-}"
      timeout -k 10 "$lim" python3 bench/e2e_step.py --json-out "$OUT/e2e.json" "${budget_arg[@]}" ${E2E_ARGS:-}; rc=$?
      say "stage e2e rc=$rc"; (( rc != 0 )) && status=1
    else
      say "stage e2e skipped: bench/e2e_step.py does not exist"
    fi
  fi
  say "done, status=$status; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
  return $status
}

main 2>&1 | tee -a "$OUT/session.log"
exit "${PIPESTATUS[0]}"
