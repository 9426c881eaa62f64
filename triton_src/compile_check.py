"""Compile the Hopper kernels for sm_90a without a GPU: the Gluon LVSA kernel in every variant the tuner can
offer, the Gluon SVOO cluster kernel (`cluster_hopper`) in its launch configs, and the portable backward
kernels (`block_sparse_bwd`) at their default tiles and the single pass's.

    python -m lvsa_kernels.triton_src.compile_check [--json FILE] [--quick] [--kernel lvsa|cluster|backward]
                                                    [--loop-mix]

Triton compiles for a named target on any machine: each variant (head dim x dtype x precision x launch config
of `tuning.hopper_configs` x short-tile width; cluster kernel: head dim x its `cluster_launch.cluster_config`
plus the 64-column ring at head dim 128, bf16) goes through Gluon -> TTGIR -> LLVM -> PTX -> cubin exactly as
at run time (Triton's own ``ptxas`` and flags); the cubin's resource usage (``cuobjdump``) gives registers and
stack frame, its SASS (``nvdisasm``) the instruction counts: all, local-memory (spills) and tensor-core
(HGMMA, and for the 8-bit modes IGMMA / QGMMA), and the instruction mix of the innermost loop holding matrix
products (``key_loop``, printed with ``--loop-mix``: per iteration and thread, the exponentials, shuffles,
byte permutes, packs and float arithmetic of the softmax path; a GPU-free first look at a consumer-loop
change). A variant fails on a compile error, when it has no wgmma, or when a local-memory instruction sits
inside a loop (between a conditional backward branch and its target), where it would run per key tile;
local-memory instructions outside loops (Triton 3.9 saves two values at the partitions' entry, where
``setmaxnreg`` shrinks the register file) are reported, not failed. Exit status 0 when every variant compiled
clean, 1 otherwise. CI runs this against every Triton release in `gluon_compat.TESTED_TRITON`
(``tests/test_hopper_compile.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Dict, Iterator, List, Optional

import torch
import triton
from triton.backends.compiler import GPUTarget

from .gluon_compat import hopper_triton_refusal
from .interpreter import interpreting
from .cluster_launch import cluster_config, cluster_hopper_meta
from .cluster_schedule import WINDOW
from .launch import hopper_meta
from .tuning import KernelConfig, hopper_configs

SM90A = GPUTarget("cuda", 90, 32)
HEAD_DIMS = (64, 128)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = ("exact", "int8_qk", "fp8")
# pointer arguments -> which operand's dtype they carry ("half": the bf16/fp16 of the inputs)
_POINTERS = {"Q": "q", "K": "k", "V": "v", "O": "half", "LSE": "fp32", "Q_SCALE": "fp32", "Q_MU": "fp32",
             "K_SCALE": "fp32", "V_SCALE": "fp32"}
_INT32_ARRAYS = ("tile_ptr", "tile_start", "tile_end", "tile_row", "row_kv_ptr", "kv_tile_start", "kv_tile_end",
                 "row_kv_masked")
_CLUSTER_INT32_ARRAYS = ("Q_PERM", "tile_row", "tile_q0", "tile_q1", "key_tiles", "key_count")
_TRITON_TYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.int8: "i8", torch.float8_e4m3fn: "fp8e4nv"}


@dataclass
class Variant:
    """A variant of the LVSA Hopper kernel (``kernel="lvsa"``), of the SVOO cluster kernel (``"cluster"``:
    exact precision, no short tiles) or of a portable backward kernel (``"bwd_dkdv"``, ``"bwd_dq"``, or
    ``"bwd_single"``, the dK/dV kernel summing dQ too: ``cfg`` holds its tiles, warps, stages and use_tma)."""

    head_dim: int
    dtype: str
    precision: str
    cfg: KernelConfig
    short_n: int
    kernel: str = "lvsa"

    @property
    def family(self) -> str:
        """``--kernel``'s name for it: lvsa, cluster or backward."""
        return "backward" if self.kernel.startswith("bwd_") else self.kernel

    @property
    def name(self) -> str:
        if self.family == "backward":
            c = self.cfg
            return (f"{self.kernel:8s} d{self.head_dim} {self.dtype} BLOCK_M={c.block_m:<3d} BLOCK_N={c.block_n:<3d} "
                    f"warps={c.num_warps} stages={c.num_stages}{' tma' if c.use_tma else ''}")
        poly = f" exp2_poly={self.cfg.exp2_poly}" if self.cfg.exp2_poly else ""
        pairs = f" tiles_per_step={self.cfg.tiles_per_step}" if self.cfg.tiles_per_step != 1 else ""
        rows = f" BLOCK_M={self.cfg.block_m}" if self.cfg.block_m != 128 else ""
        rowsum = " rowsum_mma" if self.cfg.rowsum_mma else ""
        return (f"{self.kernel:7s} d{self.head_dim} {self.dtype} {self.precision:7s} BLOCK_N={self.cfg.block_n:<3d} "
                f"stages={self.cfg.num_stages} short_n={self.short_n}{poly}{pairs}{rows}{rowsum}")


def variants(quick: bool = False) -> Iterator[Variant]:
    """Every (head dim, dtype, precision, config, short width) the tuner can hand the LVSA kernel and the ones
    waiting for a GPU measurement (`tuning.hopper_configs`' ``unmeasured``), then the cluster kernel's configs;
    ``quick``: bf16 only (fp16 differs from it only in the element type of the same products)."""
    for head_dim in HEAD_DIMS:
        for dtype in (("bf16",) if quick else tuple(DTYPES)):
            for precision in PRECISIONS:
                for cfg in hopper_configs(head_dim, precision, unmeasured=True):
                    # short tiles: none, or block_n / 2 or / 4 (`schedule._short_width`); fp8 has none
                    shorts = (0,) if precision == "fp8" else (0, cfg.block_n // 2, cfg.block_n // 4)
                    for short_n in shorts:
                        yield Variant(head_dim, dtype, precision, cfg, short_n)
    yield from cluster_variants()
    yield from backward_variants()


def backward_variants() -> Iterator[Variant]:
    """The portable backward kernels (`block_sparse_bwd`) at `backward_launch.backward_config`'s bf16 tiles,
    head dims 64 and 128: the dK/dV kernel (``"bwd_dkdv"``) and the dQ kernel (``"bwd_dq"``); then the dK/dV
    kernel that also sums dQ (``"bwd_single"``) at `backward_launch.single_pass_config`'s."""
    from .backward_launch import backward_config, single_pass_config

    for head_dim in HEAD_DIMS:
        bwd = backward_config(torch.bfloat16, head_dim)
        single = single_pass_config(torch.bfloat16, head_dim)
        for kernel, t in (("bwd_dkdv", bwd.dkdv), ("bwd_dq", bwd.dq), ("bwd_single", single.dkdv)):
            cfg = KernelConfig(t.block_m, t.block_n, t.num_warps, t.num_stages, t.use_tma, kernel="portable")
            yield Variant(head_dim, "bf16", "exact", cfg, 0, kernel)


def cluster_variants() -> Iterator[Variant]:
    """The cluster kernel's shipped configs (bf16, head dims 64 and 128) and the 64-column ring of 4 stages at
    head dim 128 (the alternative ``LVSA_KERNELS_CLUSTER_CONFIG=128,64,4,4``)."""
    for head_dim in HEAD_DIMS:
        for cfg in cluster_config(torch.device("cuda"), torch.bfloat16, head_dim, "hopper").parts:
            yield Variant(head_dim, "bf16", "exact", cfg, 0, "cluster")
    yield Variant(128, "bf16", "exact", KernelConfig(128, 64, 4, 4, kernel="hopper"), 0, "cluster")


def _operand_dtypes(precision: str, half: torch.dtype) -> Dict[str, torch.dtype]:
    """The dtypes of Q, K and V as the kernel receives them (after the 8-bit pre-passes)."""
    if precision == "exact":
        return {"q": half, "k": half, "v": half}
    return {"q": torch.int8, "k": torch.int8, "v": torch.float8_e4m3fn if precision == "fp8" else half}


def _cluster_source(v: Variant):
    """The cluster kernel as `cluster_launch._launch_hopper` specialises it for contiguous inputs."""
    from triton.experimental.gluon._runtime import GluonASTSource

    from .cluster_hopper import cluster_attn_fwd_hopper as kernel

    half = DTYPES[v.dtype]
    meta = cluster_hopper_meta(v.head_dim, half, v.cfg.block_n, v.cfg.num_stages, WINDOW)
    options = {"num_warps": meta.pop("num_warps"), "maxnreg": meta.pop("maxnreg")}
    constexprs = dict(meta, NUM_HEADS=12)
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name in ("Q", "KP", "VP", "O"):
            signature[name] = "*" + _TRITON_TYPE[half]
        elif name == "LSE":
            signature[name] = "*fp32"
        elif name in _CLUSTER_INT32_ARRAYS:
            signature[name] = "*i32"
        elif name == "qk_scale":
            signature[name] = "fp32"
        else:  # strides, lengths, slot counts
            signature[name] = "i32"
        if signature[name].startswith("*") or name.startswith("stride_"):
            attrs[(i, )] = [["tt.divisibility", 16]]
    return GluonASTSource(kernel, signature, {k: constexprs[k] for k in signature if k in constexprs}, attrs), options


def _backward_source(v: Variant):
    """A backward kernel as `backward_launch` specialises it for contiguous inputs (shared layout, no GQA)."""
    from triton.compiler import ASTSource

    from .block_sparse_bwd import block_sparse_attn_bwd_dkdv, block_sparse_attn_bwd_dq

    kernel = block_sparse_attn_bwd_dq if v.kernel == "bwd_dq" else block_sparse_attn_bwd_dkdv
    half = _TRITON_TYPE[DTYPES[v.dtype]]
    constexprs = dict(NUM_HEADS=12, KV_GROUP=1, PER_HEAD_LAYOUT=False, HEAD_DIM=v.head_dim, BLOCK_M=v.cfg.block_m,
                      BLOCK_N=v.cfg.block_n, USE_TMA=v.cfg.use_tma, ACCUMULATE_DQ=v.kernel == "bwd_single",
                      DOT_PRECISION="tf32")
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name in ("LSE", "DELTA", "DQ_UNIT"):
            signature[name] = "*fp32"
        elif name == "DQ_ACC":
            signature[name] = "*i64"
        elif name in ("Q", "K", "V", "DO", "DQ", "DK", "DV"):
            signature[name] = "*" + half
        elif name.startswith(("tile_", "span_")):
            signature[name] = "*i32"
        elif name == "sm_scale":
            signature[name] = "fp32"
        else:  # strides, lengths
            signature[name] = "i32"
        if signature[name].startswith("*") or name.startswith("stride_"):
            attrs[(i, )] = [["tt.divisibility", 16]]
    options = {"num_warps": v.cfg.num_warps, "num_stages": v.cfg.num_stages}
    return ASTSource(kernel, signature, {k: constexprs[k] for k in signature if k in constexprs}, attrs), options


def _source(v: Variant):
    from triton.experimental.gluon._runtime import GluonASTSource

    from .block_sparse_hopper import block_sparse_attn_fwd_hopper as kernel

    if v.kernel == "cluster":
        return _cluster_source(v)
    if v.kernel.startswith("bwd_"):
        return _backward_source(v)
    half = DTYPES[v.dtype]
    ops = _operand_dtypes(v.precision, half)
    meta = hopper_meta(v.head_dim, ops["q"], ops["k"], ops["v"], half, v.cfg, v.short_n, v.precision)
    options = {"num_warps": meta.pop("num_warps"), "maxnreg": meta.pop("maxnreg")}
    constexprs = dict(meta, NUM_HEADS=12, KV_GROUP=1, PER_HEAD_LAYOUT=False)
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name in _POINTERS:
            which = _POINTERS[name]
            signature[name] = "*" + ("fp32" if which == "fp32" else _TRITON_TYPE[half if which == "half" else ops[which]])
        elif name in _INT32_ARRAYS:
            signature[name] = "*i32"
        elif name == "qk_scale":
            signature[name] = "fp32"
        else:  # strides, lengths: as the launcher specializes them for contiguous [B, S, H, D] inputs
            signature[name] = "i32"
        if signature[name].startswith("*") or name.startswith("stride_"):
            attrs[(i, )] = [["tt.divisibility", 16]]
    return GluonASTSource(kernel, signature, {k: constexprs[k] for k in signature if k in constexprs}, attrs), options


_MMA_OPS = ("HGMMA", "IGMMA", "QGMMA")
# the consumer loop's instruction classes: exponentials (MUFU), warp shuffles, byte permutes, float->8/16-bit
# packs, max, the other float arithmetic
_LOOP_OPS = ("MUFU", "SHFL", "PRMT", "F2FP", "FMNMX", "FFMA", "FMUL", "FADD")


def _tool(name: str) -> str:
    """A CUDA binary tool shipped with Triton (``cuobjdump``, ``nvdisasm``)."""
    from triton.backends.nvidia import compiler as nv

    return os.path.join(os.path.dirname(nv.__file__), "bin", name)


def _cubin_report(cubin: bytes, tmp: str) -> Dict[str, int]:
    """Resources and instruction counts of the cubin Triton built (its own ``ptxas`` flags included):
    registers and stack frame from ``cuobjdump -res-usage``; from the SASS, all instructions, the local-memory
    ones (``STL``/``LDL``: spills, or arrays the compiler could not keep in registers) and the warpgroup matrix
    products (HGMMA: bf16/fp16, IGMMA: int8, QGMMA: fp8)."""
    path = os.path.join(tmp, "kernel.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    usage = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True).stdout
    sass = subprocess.run([_tool("nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout
    ops, labels, branches = [], {}, []  # (address, opcode); label -> address; (address, target label)
    pending = []
    for line in sass.splitlines():
        label = re.match(r"^(\.L\w+):", line)
        if label:
            pending.append(label.group(1))
            continue
        ins = re.match(r"^\s+/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(.*)", line)
        if ins:
            addr = int(ins.group(1), 16)
            ops.append((addr, ins.group(3)))
            labels.update((name, addr) for name in pending)
            pending = []
            target = re.search(r"`\((\.L\w+)\)", ins.group(4))
            if ins.group(3) == "BRA" and ins.group(2) and target:  # conditional: a loop's back edge (the
                branches.append((addr, target.group(1)))         # partitions' dispatch jumps back unconditionally)
    loops = [(labels[t], a) for a, t in branches if t in labels and labels[t] <= a]
    local = [a for a, op in ops if op in ("STL", "LDL")]
    names = [op for _, op in ops]
    regs, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    return {"registers": int(regs.group(1)) if regs else -1, "stack_frame": int(stack.group(1)) if stack else -1,
            "instructions": len(ops), "local_stores": names.count("STL"), "local_loads": names.count("LDL"),
            "local_in_loops": sum(any(lo <= a <= hi for lo, hi in loops) for a in local),
            **{op: names.count(op) for op in _MMA_OPS}, "key_loop": _key_loop_mix(ops, loops)}


def _key_loop_mix(ops, loops) -> Dict[str, int]:
    """The instruction mix of the first innermost loop that holds warpgroup matrix products (the LVSA kernel's
    walk over full key tiles; a loop that also holds a masked path counts both paths): ``{"instructions": n,
    "MUFU": .., "SHFL": .., ...}`` per iteration, per thread; empty if no loop holds one."""
    def holds_mma(lo, hi):
        return any(lo <= a <= hi and op in _MMA_OPS for a, op in ops)

    inner = [(lo, hi) for lo, hi in loops if holds_mma(lo, hi)
             and not any((lo, hi) != (l2, h2) and lo <= l2 and h2 <= hi and holds_mma(l2, h2) for l2, h2 in loops)]
    if not inner:
        return {}
    lo, hi = min(inner)
    body = [op for a, op in ops if lo <= a <= hi]
    return {"instructions": len(body), **{op: body.count(op) for op in _MMA_OPS + _LOOP_OPS}}


def check(v: Variant) -> Dict[str, object]:
    """Compile one variant; its row of the report (``error`` set when it failed)."""
    row: Dict[str, object] = {"variant": v.name, **{k: val for k, val in asdict(v).items() if k != "cfg"},
                              "block_m": v.cfg.block_m, "block_n": v.cfg.block_n, "stages": v.cfg.num_stages,
                              "exp2_poly": v.cfg.exp2_poly, "tiles_per_step": v.cfg.tiles_per_step,
                              "rowsum_mma": v.cfg.rowsum_mma,
                              "unmeasured": v.kernel == "lvsa" and v.cfg not in hopper_configs(v.head_dim,
                                                                                                v.precision)}
    t0 = time.perf_counter()
    try:
        src, options = _source(v)
        compiled = triton.compile(src, target=SM90A, options=options)
        with tempfile.TemporaryDirectory() as tmp:
            row.update(_cubin_report(compiled.asm["cubin"], tmp))
        row["shared_bytes"] = compiled.metadata.shared
        if row["local_in_loops"]:
            row["error"] = (f"register spill in a loop: {row['local_in_loops']} of its {row['local_stores']} local "
                            f"stores and {row['local_loads']} local loads run inside a loop of the SASS "
                            f"({row['stack_frame']}-byte stack frame)")
        elif sum(row[op] for op in _MMA_OPS) == 0:
            row["error"] = "no warpgroup matrix products (wgmma) in the SASS"
    except Exception as exc:  # noqa: BLE001 - every compile error is a result to report
        row["error"] = _root_cause(exc)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _root_cause(exc: BaseException) -> str:
    """The innermost error of a chain (Triton wraps the real one in a CompilationError per call frame)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:400]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the report (one row per variant) to this file")
    p.add_argument("--quick", action="store_true", help="bf16 only")
    p.add_argument("--jobs", type=int, default=1, help="variants compiled at once (processes)")
    p.add_argument("--kernel", choices=("lvsa", "cluster", "backward"), help="only this kernel's variants")
    p.add_argument("--loop-mix", action="store_true",
                   help="also print the instruction mix of each variant's innermost matrix-product loop")
    args = p.parse_args(argv)
    if interpreting():
        print("compile_check: TRITON_INTERPRET=1 is set; kernels must be compiled, not interpreted: unset it",
              file=sys.stderr)
        return 2
    refusal = hopper_triton_refusal()
    print(f"Triton {triton.__version__}: Gluon Hopper kernels for sm_90a"
          f"{'' if refusal is None else ' (not offered at run time: ' + refusal + ')'}")
    rows = []
    print(f"{'variant':66s} {'regs':>4s} {'stack':>5s} {'STL/LDL/in-loop':>15s} {'smem':>6s} {'SASS':>6s} {'MMA':>4s}  "
          "seconds")
    todo = [v for v in variants(args.quick) if args.kernel in (None, v.family)]
    with ProcessPoolExecutor(max(1, args.jobs)) as pool:
        results = pool.map(check, todo)
    for v, row in zip(todo, results):
        rows.append(row)
        if "registers" in row:
            mma = sum(row[op] for op in _MMA_OPS)
            local = f"{row['local_stores']}/{row['local_loads']}/{row['local_in_loops']}"
            print(f"{v.name:66s} {row['registers']:4d} {row['stack_frame']:5d} {local:>15s} {row['shared_bytes']:6d} "
                  f"{row['instructions']:6d} {mma:4d}  {row['seconds']}", flush=True)
            if args.loop_mix and row["key_loop"]:
                print("    key loop: " + " ".join(f"{op}={n}" for op, n in row["key_loop"].items() if n), flush=True)
        if "error" in row:
            print(f"  FAILED {v.name}: {row['error']}", flush=True)
    failed = [r for r in rows if "error" in r]
    print(f"{len(rows) - len(failed)} of {len(rows)} variants compiled clean on Triton {triton.__version__}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "target": "sm_90a", "rows": rows}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
