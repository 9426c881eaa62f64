#!/usr/bin/env python3
"""Backward benchmark: forward + backward of our Triton kernels vs FlexAttention (same mask) vs dense cuDNN.

    python3 bench/backward_bench.py --out "$OUT"                 # GPU: check, then Wan T=121 W=4 bf16 (< 4 min)
    python3 bench/backward_bench.py --cpu-smoke                  # same plumbing on CPU (interpreter, tiny case)

1. Gradient check on a small LVSA case with text (Wan head dim, bf16 on GPU): dq, dk, dv of ours and of
   FlexAttention (the sparse methods; Flex eager, which checks the mask it is given) against float32 reference
   gradients (`reference_attention` through autograd); relative error per gradient, <= 1e-2 required (exit
   status 1 otherwise).
2. Timing per case (default ``wan-w4-t121``, see `bench/shapes.py`): for each method the forward, forward +
   backward (``torch.autograd.grad`` with a fixed output gradient) and backward alone (``retain_graph``) as median
   ms (`lvsa_kernels.timing.bench_ms`); effective TF/s of the backward (2.5x the forward's FLOPs of the computed
   pairs, dense FLOPs for dense); ratios ours vs flex and vs dense. Our backward runs at each `--bwd-configs`
   (``default``, i.e. `backward_config`; ``DKDV/DQ`` launch tiles; ``DKDV/single``, the single pass that adds
   dQ with integer atomics in the dK/dV kernel; CPU smoke: the interpreter's config). Step 1 checks each
   explicit one too.
3. Optional, before 2: `--dkdv-sweep` / `--dq-sweep` time each backward kernel alone at each of the given tiles
   (``kernel_sweeps`` in the JSON; a ``+dq`` dK/dV item is the single pass); the pair of the fastest is then timed
   in 2 as one more config.

Methods: ``ours`` (`block_sparse_attn`'s differentiable Triton path; the forward kernel at its untuned default
config unless ``--autotune``), ``flex`` (``torch.compile(flex_attention)`` on `interop.to_flex_block_mask`, forward
and backward compiled; eager on CPU), ``dense_cudnn`` (SDPA, cuDNN backend; plain SDPA on CPU). JSON goes to
``<out>/backward_bench.json``, rewritten after each step, so a killed run keeps what it measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional

JSON_NAME = "backward_bench.json"
BWD_FLOP_FACTOR = 2.5  # backward MMAs per forward MMA (dS, dP, dV, dK, dQ vs S, O; FlashAttention's convention)


def _parse(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT"), help="output folder (default $OUT; --cpu-smoke: a temp dir)")
    p.add_argument("--cases", default=None, help="comma-separated cases of bench/shapes.py (default wan-w4-t121)")
    p.add_argument("--methods", default="ours,flex,dense_cudnn")
    p.add_argument("--bwd-configs", default="default",
                   help="our backward configs, comma-separated: 'default' (`backward_config`) or DKDV/DQ, each "
                        "block_m x block_n x warps x stages[+tma] (e.g. 64x128x8x2/128x128x8x2), or DKDV/single "
                        "(the single pass: dQ summed by the dK/dV kernel with integer atomics, e.g. "
                        "32x128x8x3+tma/single)")
    p.add_argument("--dkdv-sweep", default=None, help="dK/dV kernel tiles to time alone (block_m x block_n x "
                   "warps x stages, comma-separated); the best with --dq-sweep's best is timed as one more config")
    p.add_argument("--dq-sweep", default=None, help="dQ kernel tiles to time alone (as --dkdv-sweep)")
    p.add_argument("--autotune", action="store_true", help="tune our forward kernel first (minutes)")
    p.add_argument("--rep-ms", type=float, default=300.0)
    p.add_argument("--min-iters", type=int, default=3)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny float32 case on CPU, Triton in its interpreter")
    return p.parse_args(argv)


def _parse_tiles(item: str, flag: str, allowed=("tma",)):
    """``block_m x block_n x warps x stages`` with ``+flag`` suffixes in any order: ``(BackwardTiles, flags)``."""
    from lvsa_kernels.triton_src.backward_launch import BackwardTiles

    base, *flags = item.strip().split("+")
    parts = base.split("x")
    if len(parts) != 4 or not all(x.isdigit() for x in parts) or not set(flags) <= set(allowed):
        raise ValueError(f"{flag}: expected block_m x block_n x warps x stages like 64x128x8x2, then any of "
                         f"{', '.join('+' + a for a in allowed)}, got {item!r}")
    return BackwardTiles(*(int(x) for x in parts), "tma" in flags), set(flags)


def _tiles(item: str, flag: str):
    return _parse_tiles(item, flag)[0]


def _bwd_configs(spec: str):
    """``DKDV/DQ`` items (each ``block_m x block_n x warps x stages[+tma]``), ``DKDV/single`` (the single pass:
    ``BackwardConfig(dq=None)``), or ``default`` (None)."""
    from lvsa_kernels.triton_src.backward_launch import BackwardConfig

    configs = []
    for item in spec.split(","):
        if item.strip() == "default":
            configs.append(None)
            continue
        halves = item.split("/")
        if len(halves) != 2:
            raise ValueError(f"--bwd-configs: expected DKDV/DQ like 64x128x8x2/128x128x8x2, DKDV/single or "
                             f"'default', got {item!r}")
        dq = None if halves[1].strip() == "single" else _tiles(halves[1], "--bwd-configs")
        configs.append(BackwardConfig(_tiles(halves[0], "--bwd-configs"), dq))
    return configs


def _tiles_list(spec: Optional[str], flag: str):
    return [_tiles(item, flag) for item in spec.split(",")] if spec else []


def _dkdv_list(spec: Optional[str]):
    """``--dkdv-sweep`` items as ``(tiles, single_pass)``: a ``+dq`` flag times the single-pass variant."""
    parsed = [_parse_tiles(item, "--dkdv-sweep", ("tma", "dq")) for item in spec.split(",")] if spec else []
    return [(tiles, "dq" in flags) for tiles, flags in parsed]


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


class Method:
    """One attention implementation on ``[B, S, H, D]`` leaves q, k, v: ``forward()`` returns out ``[B, S, H, D]``."""

    def __init__(self, name: str, forward: Callable[[], Any], info: Optional[Dict[str, Any]] = None):
        self.name, self.forward, self.info = name, forward, info or {}


def _methods(names: List[str], q, k, v, layout, device, bwd=None, compile_flex: bool = True) -> List[Method]:
    """The named methods on these leaves; ``bwd``: our backward config; ``compile_flex=False`` runs
    FlexAttention eagerly (the gradient check: a compile per shape would cost the timed case's minutes)."""
    import torch
    import torch.nn.functional as F

    from lvsa_kernels import block_sparse_attn
    from lvsa_kernels.bench.baselines import _is_smem_oom
    from lvsa_kernels.interop import to_flex_block_mask

    scale = q.shape[-1] ** -0.5
    out: List[Method] = []
    for name in names:
        if name == "ours":
            if bwd is None:
                out.append(Method("ours", lambda: block_sparse_attn(q, k, v, layout, backend="triton")))
            else:
                out.append(_ours_at(q, k, v, layout, scale, bwd))
        elif name == "flex":
            from torch.nn.attention.flex_attention import flex_attention

            # the backward is timed alone on a retained graph, which a compiled backward that donates its
            # saved buffers refuses
            import torch._functorch.config as functorch_config

            functorch_config.donated_buffer = False

            mask = to_flex_block_mask(layout, 128, device=device)
            compiling = device.type == "cuda" and compile_flex
            info = {"compile_mode": "default" if compiling else "eager"}
            compiled = {"fn": torch.compile(flex_attention, dynamic=False) if compiling else flex_attention}

            def flex(mask=mask, info=info, compiled=compiled):
                args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
                try:
                    return compiled["fn"](*args, block_mask=mask, scale=scale).transpose(1, 2)
                except Exception as exc:  # shared-memory out of resources: the mode run_gpu.py falls back to
                    if info["compile_mode"] != "default" or not _is_smem_oom(exc):
                        raise
                    info["compile_mode"] = "max-autotune-no-cudagraphs"
                    compiled["fn"] = torch.compile(flex_attention, dynamic=False, mode=info["compile_mode"])
                    return compiled["fn"](*args, block_mask=mask, scale=scale).transpose(1, 2)
            out.append(Method("flex", flex, info))
        elif name == "dense_cudnn":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            kernels = [SDPBackend.CUDNN_ATTENTION] if device.type == "cuda" else [SDPBackend.MATH]

            def dense():
                with sdpa_kernel(kernels):
                    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                          scale=scale).transpose(1, 2)
            out.append(Method("dense_cudnn", dense, {"dense": True}))
        else:
            raise ValueError(f"--methods: unknown method {name!r}; known: ours, flex, dense_cudnn")
    return out


def _ours_at(q, k, v, layout, scale, bwd) -> Method:
    """Our differentiable path with backward config ``bwd`` (forward: the backend's training config)."""
    import torch

    from lvsa_kernels.backends.triton_backend import config_for
    from lvsa_kernels.triton_src.backward_launch import run_trainable

    with torch.no_grad():
        cfg = config_for(q, k, v, layout, scale)
    label = f"ours_{bwd.dkdv}_{bwd.dq if bwd.dq is not None else 'single-pass'}"
    return Method(label, lambda: run_trainable(q, k, v, layout, scale, cfg, bwd)[0],
                  {"forward_config": str(cfg), "backward_config": str(bwd)})


def check_gradients(device, dtype, names: List[str], bwd_configs=()) -> Dict[str, Any]:
    """Relative errors of dq, dk, dv per method against float32 reference gradients on a small LVSA case; ours
    at its default (``ours``) and at each explicit config of ``bwd_configs`` (``ours_<config>``)."""
    import torch

    from lvsa_kernels import LVSAPattern, reference_attention

    layout = LVSAPattern(window=1, n_first=1, reference_frames=3).plan(6, 200 if device.type == "cuda" else 24,
                                                                       text_tokens=40 if device.type == "cuda" else 5)
    D = 128 if device.type == "cuda" else 16
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(1, layout.q_len, 2, D, generator=g) for _ in range(4)]
    q, k, v = (t.to(device, dtype).requires_grad_() for t in base[:3])
    do = base[3].to(device, dtype)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = torch.autograd.grad(reference_attention(q32, k32, v32, layout), (q32, k32, v32), do.float())
    result: Dict[str, Any] = {"tokens": layout.q_len, "heads": 2, "head_dim": D, "dtype": str(dtype),
                              "density": layout.density, "methods": {}}
    # dense gives another answer; Flex runs eagerly here (its compiled kernels are what the timing runs)
    methods = _methods([n for n in names if n != "dense_cudnn"], q, k, v, layout, device, compile_flex=False)
    if "ours" in names:
        methods += [_methods(["ours"], q, k, v, layout, device, bwd)[0] for bwd in bwd_configs if bwd is not None]
    for m in methods:
        got = torch.autograd.grad(m.forward(), (q, k, v), do)
        errs = {n: _rel(a, b) for n, a, b in zip(("dq", "dk", "dv"), got, ref)}
        result["methods"][m.name] = {**errs, "ok": all(e <= 1e-2 for e in errs.values())}
    return result


def sweep_kernels(case, device, dkdv_tiles, dq_tiles, rep_ms: float) -> Dict[str, Any]:
    """Each backward kernel alone at each of its tiles, on one set of inputs (out, lse and delta computed once):
    median ms, TF/s (dK/dV runs 4 MMAs per pair, 2x the forward's FLOPs; dQ 3, 1.5x), registers and spills per
    thread of the compiled kernel, and the relative error of its gradient against the first tiles' (a tile-size
    bug shows as a large error). ``dkdv_tiles``: ``(tiles, single_pass)``; the single-pass variant (dK/dV adding
    dQ with integer atomics, timed with its accumulator's zeroing, its bound pre-pass and its scaling, 5 MMAs per
    pair) is checked against the first plain dK/dV and dQ launches and is what would replace the dQ kernel."""
    import torch

    from lvsa_kernels import block_sparse_attn
    from lvsa_kernels.bench.harness import layout_flops, make_inputs
    from lvsa_kernels.timing import bench_ms
    from lvsa_kernels.triton_src.backward_launch import (backward_config, launch_delta, launch_dkdv, launch_dq,
                                                         launch_single_pass)
    from lvsa_kernels.triton_src.schedule import build_key_schedule, build_pair_masks, build_schedule

    layout = case.layout()
    q, k, v = make_inputs(case, device, seed=0)
    do = torch.randn_like(q)
    scale = case.head_dim ** -0.5
    per_head = layout.num_heads > 1
    fwd_flops = layout_flops(layout, case.batch, case.heads, case.head_dim)
    with torch.no_grad():
        out, lse = block_sparse_attn(q, k, v, layout, backend="triton", scale=scale, return_lse=True)
    delta = torch.empty(lse.shape, dtype=torch.float32, device=device)
    launch_delta(do, out, None, delta)
    rec: Dict[str, Any] = {"case": case.name, "dkdv": {}, "dkdv_single_pass": {}, "dq": {}}
    first: Dict[str, Any] = {}

    def run(kind, tiles):
        if kind in ("dkdv", "dkdv_single_pass"):
            sched = build_key_schedule(layout, tiles.block_n, device)
            dk, dv = torch.empty_like(k), torch.empty_like(v)
            if kind == "dkdv":
                return (lambda: launch_dkdv(do, q, k, v, lse, delta, dk, dv, sched, per_head, scale, tiles)), \
                    (dk, dv), 2.0
            dq, masks = torch.empty_like(q), build_pair_masks(layout, device)

            def single_pass():  # what replaces the dQ kernel: the bound pre-pass, the pass, the scaling
                return launch_single_pass(do, q, k, v, out, lse, None, dq, dk, dv, sched, masks, per_head, scale,
                                          tiles)[0]
            return single_pass, (dk, dv, dq), 2.5
        sched = build_schedule(layout, tiles.block_m, device)
        dq = torch.empty_like(q)
        return (lambda: launch_dq(do, q, k, v, lse, delta, dq, sched, per_head, scale, tiles)), (dq,), 1.5

    # the single-pass variant's dk, dv and dq are checked against the plain kernels' (the first launch of each)
    single = [t for t, one_pass in dkdv_tiles if one_pass]
    plain = [t for t, one_pass in dkdv_tiles if not one_pass]
    if single:  # its references: the default launches where none of a kernel was asked for
        default = backward_config(q.dtype, case.head_dim, device)
        plain, dq_tiles = plain or [default.dkdv], dq_tiles or [default.dq]
    for kind, tiles_list in (("dkdv", plain), ("dq", dq_tiles), ("dkdv_single_pass", single)):
        for tiles in tiles_list:
            label = str(tiles) + ("+dq" if kind == "dkdv_single_pass" else "")
            t0 = time.perf_counter()
            try:
                fn, grads, factor = run(kind, tiles)
                kernel = fn()
                ms = bench_ms(fn, device, 25.0, rep_ms)["ms"]
            except Exception as exc:  # e.g. out of shared memory: recorded, the others still run
                rec[kind][label] = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:300]}
                continue
            if kind in ("dkdv", "dq") and kind not in first:
                first[kind] = [g.clone() for g in grads]
            want = first.get("dkdv", []) + first.get("dq", []) if kind == "dkdv_single_pass" else first[kind]
            err = max((_rel(g, f) for g, f in zip(grads, want)), default=None) if len(want) == len(grads) else None
            rec[kind][label] = {"status": "ok", "ms": ms, "tflops": factor * fwd_flops / (ms * 1e-3) / 1e12,
                                "rel_err_vs_first": err, "registers": getattr(kernel, "n_regs", None),
                                "spills": getattr(kernel, "n_spills", None),
                                "seconds_incl_compile": round(time.perf_counter() - t0, 1)}
        ok = {t: r for t, r in rec[kind].items()
              if r["status"] == "ok" and r["rel_err_vs_first"] is not None and r["rel_err_vs_first"] <= 1e-2}
        rec[f"best_{kind}"] = min(ok, key=lambda t: ok[t]["ms"], default=None)
    return rec


def _best_pair(sweep: Dict[str, Any], configs) -> list:
    """``[BackwardConfig(best dK/dV tiles, best dQ tiles)]`` of a sweep where both kernels were swept and the
    pair is not among ``configs`` yet; else ``[]``."""
    from lvsa_kernels.triton_src.backward_launch import BackwardConfig

    if not (sweep.get("best_dkdv") and sweep.get("best_dq")):
        return []
    best = BackwardConfig(_tiles(sweep["best_dkdv"], "sweep"), _tiles(sweep["best_dq"], "sweep"))
    return [] if best in configs else [best]


def time_case(case, device, names: List[str], bwd_configs, rep_ms: float, min_iters: int) -> Dict[str, Any]:
    import torch

    from lvsa_kernels.bench.harness import layout_flops, make_inputs
    from lvsa_kernels.timing import bench_ms

    layout = case.layout()
    q, k, v = (t.requires_grad_() for t in make_inputs(case, device, seed=0))
    do = torch.randn_like(q)
    fwd_flops = layout_flops(layout, case.batch, case.heads, case.head_dim)
    dense_flops = 4.0 * case.batch * case.heads * case.head_dim * layout.q_len * layout.kv_len
    rec: Dict[str, Any] = {"case": case.describe(), "density": layout.density, "forward_flops": fwd_flops,
                           "methods": {}}
    methods = []
    for name in names:
        if name == "ours":
            methods += [_methods(["ours"], q, k, v, layout, device, bwd)[0] for bwd in bwd_configs]
        else:
            methods += _methods([name], q, k, v, layout, device)
    for m in methods:
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                fwd = bench_ms(m.forward, device, 25.0, rep_ms, min_iters)
            both = bench_ms(lambda: torch.autograd.grad(m.forward(), (q, k, v), do), device, 25.0, rep_ms, min_iters)
            retained = m.forward()
            bwd = bench_ms(lambda: torch.autograd.grad(retained, (q, k, v), do, retain_graph=True), device, 25.0,
                           rep_ms, min_iters)
            retained = None  # frees the retained graph before the next method
        except Exception as exc:  # recorded, the other methods still run
            rec["methods"][m.name] = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:500]}
            continue
        work = dense_flops if m.info.get("dense") else fwd_flops
        rec["methods"][m.name] = {
            "status": "ok", "forward_ms": fwd["ms"], "fwd_bwd_ms": both["ms"], "backward_ms": bwd["ms"],
            "backward_tflops": BWD_FLOP_FACTOR * work / (bwd["ms"] * 1e-3) / 1e12,
            "backward_dense_equiv_tflops": BWD_FLOP_FACTOR * dense_flops / (bwd["ms"] * 1e-3) / 1e12,
            "seconds_incl_compile": round(time.perf_counter() - t0, 1), **m.info}
    ok = {n: r for n, r in rec["methods"].items() if r["status"] == "ok"}
    ours = min((n for n in ok if n.startswith("ours")), key=lambda n: ok[n]["backward_ms"], default=None)
    if ours:
        s = {"best_ours": ours}
        for other in ("flex", "dense_cudnn"):
            if other in ok:
                s[f"backward_speedup_vs_{other}"] = ok[other]["backward_ms"] / ok[ours]["backward_ms"]
                s[f"fwd_bwd_speedup_vs_{other}"] = ok[other]["fwd_bwd_ms"] / ok[ours]["fwd_bwd_ms"]
        rec["summary"] = s
    return rec


def _write(path: str, doc: Dict[str, Any]) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def main(argv: Optional[List[str]] = None) -> int:
    args = _parse(argv)
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel module is imported
    if not args.autotune:
        os.environ.setdefault("LVSA_KERNELS_TRITON_AUTOTUNE", "0")
    import torch

    from lvsa_kernels.bench import shapes
    from lvsa_kernels.bench.run_gpu import environment
    from lvsa_kernels.triton_src.backward_launch import INTERPRETER_BACKWARD

    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("backward_bench.py: no CUDA device; use --cpu-smoke on a CPU machine", file=sys.stderr)
        return 2
    try:
        names = [n.strip() for n in args.methods.split(",") if n.strip()]
        bwd_configs = _bwd_configs(args.bwd_configs)
        sweeps = (_dkdv_list(args.dkdv_sweep), _tiles_list(args.dq_sweep, "--dq-sweep"))
        cases = shapes.select_cases(args.cases or ("tiny-text-t8" if args.cpu_smoke else "wan-w4-t121"))
    except ValueError as exc:
        print(f"backward_bench.py: {exc}", file=sys.stderr)
        return 2
    doc: Dict[str, Any] = {"environment": environment(device.type), "argv": sys.argv[1:], "cases": [],
                           "skipped_methods": {}}
    if args.cpu_smoke:
        cases = [dataclasses.replace(c, head_dim=16) for c in cases]  # head dim 16: seconds in the interpreter
        bwd_configs = [INTERPRETER_BACKWARD]
        if "flex" in names:
            names.remove("flex")
            doc["skipped_methods"]["flex"] = "FlexAttention has no backward on CPU"
    out_dir = args.out or tempfile.mkdtemp(prefix="lvsa_backward_bench_")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, JSON_NAME)
    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    doc["gradient_check"] = check_gradients(device, dtype, names, [] if args.cpu_smoke else bwd_configs)
    _write(path, doc)
    failed = [n for n, r in doc["gradient_check"]["methods"].items() if not r["ok"]]
    from lvsa_kernels.triton_src.backward_launch import backward_config

    for case in cases:
        configs = [c or backward_config(dtype, case.head_dim, device) for c in bwd_configs]
        if any(sweeps):
            doc.setdefault("kernel_sweeps", []).append(sweep_kernels(case, device, *sweeps, args.rep_ms))
            _write(path, doc)
            configs += _best_pair(doc["kernel_sweeps"][-1], configs)
        doc["cases"].append(time_case(case, device, names, configs, args.rep_ms, args.min_iters))
        _write(path, doc)
    print(json.dumps({"gradient_check": doc["gradient_check"]["methods"],
                      "cases": [{"case": c["case"]["name"], "summary": c.get("summary"),
                                 **{n: {k: r.get(k) for k in ("status", "forward_ms", "fwd_bwd_ms", "backward_ms",
                                                              "backward_tflops", "error")}
                                    for n, r in c["methods"].items()}} for c in doc["cases"]]}, indent=1))
    print(f"wrote {path}")
    errors = [n for c in doc["cases"] for n, r in c["methods"].items() if r["status"] != "ok"]
    if failed or errors:
        print(f"gradient check failed: {failed}; errors: {errors}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
