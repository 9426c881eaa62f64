#!/usr/bin/env bash
# Pack a Triton release from the package index into one archive small enough for one device call (< 64 MiB),
# for GPU machines that have another Triton and no network; unpack it there with `unpack`.
#
#   bash bench/triton_bundle.sh pack 3.9.0 .tri          # here: download, slim, write .tri/triton-3.9.0-slim.tar.xz
#   eval "$(bash bench/triton_bundle.sh unpack .tri/triton-3.9.0-slim.tar.xz /tmp/triton-3.9.0)"   # there
#
# Slimming keeps what compiles and launches NVIDIA kernels: the Python package, libtriton.so (stripped of its
# debug info: 477 -> 192 MB, about 40 MB compressed), the CUDA headers and libdevice. It drops the AMD backend,
# the profiler (proton, CUPTI), the instrumentation plugins and the bundled ptxas / cuobjdump / nvdisasm:
# `unpack` points Triton at the GPU machine's own CUDA tools instead (TRITON_PTXAS_PATH and friends), so the
# PTX is assembled by that CUDA's ptxas (13.0 on the lent machines) rather than the one in the wheel, and sets
# TRITON_BACKENDS_IN_TREE=1 so the machine's own Triton's entry points (which name the AMD backend) are ignored.
# The wheel is for CPython 3.12 on x86-64 (the GPU machines' Python).
set -euo pipefail

pack() {
  local version=$1 dest=$2 work
  work=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 -d "$work" "triton==$version"
  (cd "$work" && unzip -q triton-*.whl 'triton/*' -x 'triton/backends/amd/*' 'triton/backends/nvidia/bin/*' \
     'triton/backends/nvidia/lib/cupti*' 'triton/_C/libproton.so' 'triton/profiler/*' 'triton/instrumentation/*' \
     'triton/plugins/*' 'triton/FileCheck')
  strip --strip-unneeded "$work/triton/_C/libtriton.so"
  mkdir -p "$dest"
  tar -C "$work" -cf - triton | xz -T0 -6 > "$dest/triton-$version-slim.tar.xz"
  rm -rf "$work"
  ls -la "$dest/triton-$version-slim.tar.xz"
}

unpack() {  # prints the exports that put the unpacked Triton first (for eval)
  local archive=$1 target=$2 cuda_bin
  mkdir -p "$target"
  tar -C "$target" -xJf "$archive"
  cuda_bin=$(dirname "$(command -v ptxas || echo /usr/local/cuda/bin/ptxas)")
  echo "export PYTHONPATH=$target\${PYTHONPATH:+:\$PYTHONPATH}"
  echo "export TRITON_BACKENDS_IN_TREE=1 TRITON_PTXAS_PATH=$cuda_bin/ptxas TRITON_PTXAS_BLACKWELL_PATH=$cuda_bin/ptxas" \
       "TRITON_CUOBJDUMP_PATH=$cuda_bin/cuobjdump TRITON_NVDISASM_PATH=$cuda_bin/nvdisasm"
}

"$@"
