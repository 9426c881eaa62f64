"""Sweep the Triton kernel's launch configs on real LVSA layouts (GPU), next to dense cuDNN SDPA.

For each case: every candidate config's median time (do_bench), registers/spills of the compiled
kernel (portable kernel), effective TFLOP/s on the computed pairs, and every config's relative error
against a float32 reference (into a NaN-poisoned output). Candidates include the warp-specialised Hopper
kernel on sm_90. Used to choose the tuning candidates and to explain the kernels' speed.

    python3 bench/kernel_sweep.py --out "$OUT" [--cases wan_w4_t121,...] [--time-budget 300]
                                  [--precisions exact,fp8,int8_qk] [--max-portable N] [--unmeasured]

With 8-bit precisions (docs/fp8.md) a config counts as correct within 5e-2 of float32 attention (exact: 1e-2).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from lvsa_kernels import LVSAPattern, reference_attention
from lvsa_kernels.triton_src.launch import descriptors_allowed, hopper_supports, launch, run_scheduled
from lvsa_kernels.triton_src.schedule import build_key_tiles, build_schedule
from lvsa_kernels.timing import bench_ms
from lvsa_kernels.triton_src.tuning import KernelConfig, candidate_configs, hopper_configs

CASES = {  # (pattern, latent frames, tokens per frame)
    "wan_w4_t121": (LVSAPattern(window=4), 121, 1560),
    "wan_w4_t81": (LVSAPattern(window=4), 81, 1560),
    "wan_t21_dense": (LVSAPattern(), 21, 1560),
    "wan_w3_t121": (LVSAPattern(), 121, 1560),
    # the same geometry with 1536-token frames: key spans start at multiples of 128 tokens (no ragged 8-bit tiles)
    "wan_w4_t121_f1536": (LVSAPattern(window=4), 121, 1536),
}
H, D = 12, 128


def median_ms(fn) -> float:
    return bench_ms(fn, torch.device("cuda"), warmup_ms=25, rep_ms=150)["ms"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--time-budget", type=float, default=300.0)
    ap.add_argument("--extra-configs", default="", help="semicolon-separated BM,BN,warps,stages,tma,ws")
    ap.add_argument("--max-portable", type=int, default=None, help="time only the first N portable-kernel candidates")
    ap.add_argument("--precisions", default="exact", help="comma list of exact, fp8, int8_qk")
    ap.add_argument("--unmeasured", action="store_true",
                    help="also the Hopper configs no GPU run has timed yet (tuning.hopper_configs(unmeasured=True))")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()
    results = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "torch": torch.__version__, "triton": triton.__version__, "cases": {}}
    torch.manual_seed(0)
    for name in args.cases.split(","):
        if time.time() - t_start > args.time_budget:
            results["cases"][name] = {"skipped": "time budget"}
            continue
        pattern, T, P = CASES[name]
        layout = pattern.plan(T, P)
        S = layout.q_len
        q, k, v = (torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        flops_eff = 4 * H * D * layout.computed_pairs
        row = {"T": T, "S": S, "density": layout.density, "configs": []}
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            row["dense_cudnn_ms"] = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt))
        scale = D ** -0.5
        ref = reference_attention(q.float(), k.float(), v.float(), layout)
        best = None
        for precision in args.precisions.split(","):
            tma_ok = descriptors_allowed(k, v) and precision != "fp8"
            configs = candidate_configs(D, tma_ok, q.dtype, hopper_supports(q, k, v), precision)
            if args.unmeasured and hopper_supports(q, k, v):
                configs += [c for c in hopper_configs(D, precision, unmeasured=True) if c not in configs]
            if args.max_portable is not None:
                hopper = [c for c in configs if c.kernel == "hopper"]
                configs = hopper + [c for c in configs if c.kernel != "hopper"][:args.max_portable]
            for spec in filter(None, args.extra_configs.split(";")):
                bm, bn, w, st, tma, ws = spec.split(",")
                configs.append(KernelConfig(int(bm), int(bn), int(w), int(st), tma == "1", ws == "1"))
            max_err = 1e-2 if precision == "exact" else 5e-2
            for cfg in configs:
                entry = {"config": str(cfg), "precision": precision}
                try:
                    sched = build_schedule(layout, cfg.block_m, q.device)
                    tiles = (build_key_tiles(layout, cfg.block_n, q.device, precision) if cfg.kernel == "hopper"
                             else None)
                    out = torch.full_like(q, float("nan"))
                    if cfg.kernel == "hopper":
                        run_scheduled(q, k, v, sched, False, scale, cfg, out=out, key_tiles=tiles, precision=precision)
                    else:
                        lse = torch.empty(1, H, S, device="cuda", dtype=torch.float32)
                        handle = launch(q, k, v, out, lse, sched.tensors(), sched.max_tiles, False, scale, cfg,
                                        precision)
                        entry["regs"] = getattr(handle, "n_regs", None)
                        entry["spills"] = getattr(handle, "n_spills", None)
                    entry["rel_err"] = ((out.float() - ref).norm() / ref.norm()).item()
                    entry["nan_out"] = bool(torch.isnan(out).any())
                    ms = median_ms(lambda: run_scheduled(q, k, v, sched, False, scale, cfg, key_tiles=tiles,
                                                        precision=precision))
                    entry.update(ms=ms, eff_tflops=flops_eff / ms / 1e9, vs_cudnn=row["dense_cudnn_ms"] / ms)
                    ok = entry["rel_err"] <= max_err and not entry["nan_out"]
                    if precision == "exact" and ok and (best is None or ms < best[1]):
                        best = (cfg, ms, entry["rel_err"], entry["nan_out"])
                except Exception as exc:  # noqa: BLE001 - record and go on
                    entry["error"] = f"{type(exc).__name__}: {exc}"[:400]
                row["configs"].append(entry)
                print(name, entry, flush=True)
        del ref
        if best is not None:
            row["best"], row["best_ms"], row["rel_err"], row["nan_out"] = str(best[0]), best[1], best[2], best[3]
        results["cases"][name] = row
        with open(os.path.join(args.out, "kernel_sweep.json"), "w") as f:
            json.dump(results, f, indent=1)
    print("\n== kernel sweep:", results["device"], "torch", results["torch"], "triton", results["triton"])
    for name, row in results["cases"].items():
        if "best" not in row:
            print(name, row.get("skipped", "no config ran"))
            continue
        print(f"{name}: T={row['T']} density={row['density']:.3f} cudnn={row['dense_cudnn_ms']:.2f}ms "
              f"best={row['best_ms']:.2f}ms ({row['dense_cudnn_ms'] / row['best_ms']:.2f}x) [{row['best']}] "
              f"rel_err={row['rel_err']:.2e} nan={row['nan_out']}")
        for e in sorted(row["configs"], key=lambda e: e.get("ms", 1e9)):
            print(f"   {e.get('ms', float('nan')):8.2f} ms  {e.get('eff_tflops', 0):6.1f} TF/s  regs={e.get('regs')} "
                  f"spills={e.get('spills')} err={e.get('rel_err', float('nan')):.1e}  {e['precision']:7s} "
                  f"{e['config']}  {e.get('error', '')[:120]}")
        if "best_ms" in row:  # each precision's fastest correct config against the exact best of this run
            for precision in sorted({e["precision"] for e in row["configs"]} - {"exact"}):
                ok = [e for e in row["configs"] if e["precision"] == precision and "ms" in e
                      and e["rel_err"] <= 5e-2 and not e["nan_out"]]
                if ok:
                    e = min(ok, key=lambda e: e["ms"])
                    print(f"   {precision}: {row['best_ms'] / e['ms']:.3f}x faster than exact ({e['ms']:.2f} vs "
                          f"{row['best_ms']:.2f} ms) [{e['config']}]")


if __name__ == "__main__":
    main()
