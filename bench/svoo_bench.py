"""SVOO benchmark: clustering, permutation and block-sparse attention vs dense cuDNN SDPA, plus recall.

Wan 2.1 1.3B shape (12 heads x 128, bf16), 81 frames at 480p (21x30x52 = 32,760 tokens) and 720p
(21x45x80 = 75,600 tokens); q/k are random with cluster structure (random weights are fine for timing);
the profile floor uses keep ratios in the published Wan 1.3B band 0.15-0.20. It runs SVOO's GPU path
(device-side plan + packed cluster kernel, `lvsa_kernels.triton_src.cluster_path`) and times per case:

- ``cluster``: co-clustering with the fused assignment kernel (what a re-clustering step adds),
- ``refresh``: centroids of the cached clusters from the current q, k (what a reuse step adds),
- ``select``: block selection, ``permute``: k, v into key-cluster order, ``plan``: the device schedule,
- ``sparse_attn``: the packed cluster kernel alone (reads q and writes out through the permutation): the one
  `cluster_launch.cluster_kernel` picks (the Hopper kernel where it can run; ``--cluster-kernel`` or
  ``LVSA_KERNELS_CLUSTER_KERNEL`` choose; ``--cluster-kernel both`` times both on the same plan inputs and the
  reuse call with each: an A/B in one process),
- ``svoo_reuse`` / ``svoo_recluster``: one full `SVOOPattern.attention` call on a reuse / re-clustering step,
- ``dense``: cuDNN SDPA on the same q, k, v,

and measures recall = softmax mass covered by the selected blocks for sampled query rows (exact, dense
softmax over all keys) and the kernel's error on those rows vs float32 attention over the selected blocks,
and counts the GPU operations (kernels, copies, memsets: torch.profiler) of one reuse call.
Cases run floor by floor (both resolutions at the first floor first); about 2 minutes on an H200.
``--sweep`` adds a launch-config sweep of the cluster kernel. Writes ``svoo_bench.json`` under ``--out``.

    python3 bench/svoo_bench.py --out "$OUT" [--cases wan480,wan720] [--floors 0.15,0.20] [--sweep]
                                [--cluster-kernel auto|hopper|portable|both]
    TRITON_INTERPRET=1 python3 bench/svoo_bench.py --cpu-smoke --out /tmp/svoo_smoke   # tiny, CPU interpreter
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from lvsa_kernels import SVOOPattern
from lvsa_kernels.reference.svoo import co_cluster, select_blocks
from lvsa_kernels.reference.svoo_profile import SVOOProfile
from lvsa_kernels.svoo_attention import triton_cluster_ops
from lvsa_kernels.svoo_eval import clustered_qkv, sampled_rows, selected_attention
from lvsa_kernels.timing import bench_ms
from lvsa_kernels.triton_src import cluster_launch, cluster_path
from lvsa_kernels.triton_src.cluster_launch import (KERNEL_ENV, ClusterConfig, cluster_attention, cluster_config,
                                                    cluster_kernel)
from lvsa_kernels.triton_src.cluster_schedule import build_cluster_schedule
from lvsa_kernels.triton_src.tuning import KernelConfig

CASES = {"wan480": (21, 30, 52), "wan720": (21, 45, 80), "smoke": (2, 4, 6)}


def timer(device: torch.device, reps: int) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of ``fn`` (`lvsa_kernels.timing.bench_ms`: do_bench on CUDA, ``reps`` calls on CPU)."""
    if device.type == "cuda":
        return lambda fn: bench_ms(fn, device, warmup_ms=3, rep_ms=max(20, reps * 10))["ms"]
    return lambda fn: bench_ms(fn, device, warmup_ms=0, rep_ms=0, min_iters=reps)["ms"]


def sampled_error(out: torch.Tensor, ref: torch.Tensor, rows: torch.Tensor) -> float:
    """Relative error of ``out [1, S, H, D]`` on query ``rows`` vs ``ref [rows, H, D]``."""
    return float((out[0, rows].float() - ref).norm() / ref.norm())


def run_case(name: str, floor: float, args, device, dtype, measure) -> Dict[str, object]:
    T, Hh, Ww = CASES[name]
    S = T * Hh * Ww
    H, D = args.heads, args.head_dim
    q, k, v = clustered_qkv(S, H, D, args.centers, device, dtype, seed=0)
    profile = SVOOProfile(torch.full((2, 1, H), floor))  # steps 1 (clustering) and 2 (reuse)
    pat = SVOOPattern(profile=profile, top_p=args.top_p, q_clusters=args.q_clusters, k_clusters=args.k_clusters,
                      iterations=args.iterations, warmup_steps=0, recluster_every=10**6, clip=(0.0, 1.0))
    gq, gk = (x.transpose(1, 2).reshape(H, S, D) for x in (q, k))
    scale = 1.0 / math.sqrt(D)
    res: Dict[str, object] = {"case": name, "tokens": S, "heads": H, "head_dim": D, "dtype": str(dtype),
                              "floor_keep_ratio": floor, "top_p": args.top_p, "q_clusters": args.q_clusters,
                              "k_clusters": args.k_clusters, "iterations": args.iterations}
    assign_fn = cluster_path.assign_fn(q)
    cl = co_cluster(gq, gk, args.q_clusters, args.k_clusters, args.iterations, seed=0, assign_fn=assign_fn,
                    means_fn=cluster_path.means_fn)
    floors = pat.min_blocks(0, 0, H)
    mask = select_blocks(cl.q.centroids, cl.k.centroids, cl.k.sizes, args.top_p, floors, scale)
    kp, vp = cluster_path.permute_keys(k, v, cl.k.perm)
    qperm = cl.q.perm.to(torch.int32)
    rows = sampled_rows(S, args.recall_queries, device)
    ref, recall = selected_attention(q, k, v, cl, mask, rows)
    kernels = kernels_to_time(args.cluster_kernel, q)
    res.update(recall=recall, cluster_kernel=kernels[0], q_cluster_size_max=int(cl.q.sizes.max()),
               k_clusters_empty=int((cl.k.sizes == 0).sum()))

    t = {}
    t["cluster"] = measure(lambda: co_cluster(gq, gk, args.q_clusters, args.k_clusters, args.iterations, seed=0,
                                              assign_fn=assign_fn, means_fn=cluster_path.means_fn))
    ops = triton_cluster_ops(q, k)
    t["refresh"] = measure(lambda: (ops.refresh(q, cl.q), ops.refresh(k, cl.k)))
    t["select"] = measure(lambda: select_blocks(cl.q.centroids, cl.k.centroids, cl.k.sizes, args.top_p, floors, scale))
    t["permute"] = measure(lambda: cluster_path.permute_keys(k, v, cl.k.perm))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            t["dense"] = measure(lambda: F.scaled_dot_product_attention(qt, kt, vt))
    else:
        t["dense"] = measure(lambda: F.scaled_dot_product_attention(qt, kt, vt))
    per_kernel = {}
    previous = os.environ.get(KERNEL_ENV)
    try:
        for kernel in kernels:  # the first is the case's headline kernel (its numbers fill the top-level fields)
            os.environ[KERNEL_ENV] = kernel  # SVOOPattern's calls pick the kernel through cluster_path.attend
            cfg = cluster_config(device, dtype, D, kernel)
            sched = build_cluster_schedule(mask, cl.q.sizes, cl.k.sizes, S, cfg.tiles)
            out, _ = cluster_attention(q, kp, vp, qperm, sched, scale, cfg)
            pairs = float((cl.q.sizes.double().reshape(-1) * sched.keys_per_row.double()).sum())
            kt_ms = {"plan": measure(lambda: build_cluster_schedule(mask, cl.q.sizes, cl.k.sizes, S, cfg.tiles)),
                     "sparse_attn": measure(lambda: cluster_attention(q, kp, vp, qperm, sched, scale, cfg))}
            pat.reset()
            pat.attention(q, k, v, 0, 0, backend="triton")  # fill the cache: later steps reuse it
            reuse = lambda: pat.attention(q, k, v, 1, 0, backend="triton")  # noqa: E731
            kt_ms["svoo_reuse"] = measure(reuse)
            per_kernel[kernel] = {
                "config": str(cfg), "ms": kt_ms, "rel_err_sampled": sampled_error(out, ref, rows),
                "sparse_effective_tflops": 4 * D * pairs / kt_ms["sparse_attn"] / 1e9,
                "speedup_reuse": t["dense"] / kt_ms["svoo_reuse"],
                "key_tiles": [int(kt.count.sum()) for _, kt in sched.parts],
                "query_tiles": [int((qt.q1 > qt.q0).sum()) for qt, _ in sched.parts]}
            print(f"  {name} floor {floor}: {kernel} cluster kernel {cfg}: sparse_attn {kt_ms['sparse_attn']:.2f} ms "
                  f"= {per_kernel[kernel]['sparse_effective_tflops']:.0f} effective TF/s, reuse call "
                  f"{kt_ms['svoo_reuse']:.2f} ms = {per_kernel[kernel]['speedup_reuse']:.2f}x dense, "
                  f"err {per_kernel[kernel]['rel_err_sampled']:.1e}", flush=True)
            if kernel == kernels[0]:
                t.update(kt_ms)
                res.update(density=pairs / (H * S * S), computed_pairs=pairs, config=str(cfg),
                           rel_err_sampled=per_kernel[kernel]["rel_err_sampled"], key_tiles=per_kernel[kernel]["key_tiles"],
                           query_tiles=per_kernel[kernel]["query_tiles"])
                t["svoo_recluster"] = measure(lambda: (pat.reset(), pat.attention(q, k, v, 0, 0, backend="triton")))
                pat.attention(q, k, v, 0, 0, backend="triton")
                res["gpu_ops_reuse"] = gpu_ops(reuse, device)
    finally:
        if previous is None:
            os.environ.pop(KERNEL_ENV, None)
        else:
            os.environ[KERNEL_ENV] = previous
    res["kernels"] = per_kernel
    res["ms"] = t
    reuse_overhead = t["refresh"] + t["select"] + t["permute"] + t["plan"]
    res.update(speedup_reuse=t["dense"] / t["svoo_reuse"], speedup_recluster=t["dense"] / t["svoo_recluster"],
               reuse_overhead_share=reuse_overhead / t["sparse_attn"],
               cluster_permute_share=(t["cluster"] + t["permute"]) / t["sparse_attn"],
               sparse_effective_tflops=per_kernel[kernels[0]]["sparse_effective_tflops"],
               dense_tflops=4 * H * D * S * S / t["dense"] / 1e9)
    if args.sweep and not getattr(args, "swept", False):
        args.swept = True  # once, on the first case
        res["sweep"] = sweep(q, kp, vp, qperm, mask, cl, S, scale, measure, kernels[0])
    return res


def gpu_ops(fn: Callable[[], object], device: torch.device) -> object:
    """GPU operations (kernels, copies, memsets) of one call of ``fn`` (torch.profiler), None on CPU."""
    if device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)


_BIG = KernelConfig(128, 128, 8, 3)
SWEEP = [  # (launch configs, window)
    ((_BIG,), 4), ((_BIG, KernelConfig(64, 64, 4, 3)), 4), ((_BIG, KernelConfig(64, 128, 4, 3)), 4),
    ((_BIG, KernelConfig(64, 128, 8, 3)), 4), ((_BIG, KernelConfig(64, 128, 4, 2)), 4),
    ((KernelConfig(128, 128, 8, 4), KernelConfig(64, 64, 4, 3)), 4), ((_BIG, KernelConfig(64, 64, 4, 3)), 8),
    ((KernelConfig(64, 64, 4, 3),), 4),
]
_HOPPER = dict(num_warps=4, kernel="hopper")
HOPPER_SWEEP = [  # 128-row query tiles: the ring (key-tile width, stages), the window
    ((KernelConfig(128, 128, num_stages=2, **_HOPPER),), 4), ((KernelConfig(128, 64, num_stages=4, **_HOPPER),), 4),
    ((KernelConfig(128, 128, num_stages=2, **_HOPPER),), 8), ((KernelConfig(128, 64, num_stages=4, **_HOPPER),), 8),
    ((KernelConfig(128, 128, num_stages=2, **_HOPPER), KernelConfig(64, 128, num_stages=2, **_HOPPER)), 4),
]


def kernels_to_time(choice: str, q: torch.Tensor) -> List[str]:
    """The cluster kernels to time: ``both`` -> hopper (where it can run) then portable; ``auto`` ->
    `cluster_kernel` (which also reads ``LVSA_KERNELS_CLUSTER_KERNEL``); else the one named."""
    if choice == "auto":
        return [cluster_kernel(q)]
    refusal = cluster_launch.cluster_hopper_refusal(q)
    if choice == "both":
        return ["hopper", "portable"] if refusal is None else ["portable"]
    if choice == "hopper" and refusal is not None:
        raise SystemExit(f"--cluster-kernel hopper: the Hopper cluster kernel {refusal}")
    return [choice]


def sweep(q, kp, vp, qperm, mask, cl, S, scale, measure, kernel: str) -> List[Dict[str, object]]:
    """Milliseconds of the cluster kernel per launch config (one process: ratios comparable): `SWEEP` on the
    portable kernel, `HOPPER_SWEEP` on the Hopper one."""
    out = []
    for parts, window in (HOPPER_SWEEP if kernel == "hopper" else SWEEP):
        cfg = ClusterConfig(parts)
        name = f"{cfg} window={window}"
        try:
            sched = build_cluster_schedule(mask, cl.q.sizes, cl.k.sizes, S, cfg.tiles, window)
            ms = measure(lambda: cluster_attention(q, kp, vp, qperm, sched, scale, cfg))
            out.append({"config": name, "ms": ms, "query_tiles": [int((qt.q1 > qt.q0).sum()) for qt, _ in sched.parts]})
        except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory
            out.append({"config": name, "error": f"{type(exc).__name__}: {exc}"[:200]})
        print("sweep", out[-1], flush=True)
    return out


def table(results: List[Dict[str, object]]) -> str:
    cols = ["case", "kernel", "floor", "density", "recall", "err", "cluster", "refresh", "select", "perm", "plan",
            "sparse", "reuse", "reclust", "dense", "x reuse", "x reclust", "ovh/sparse", "TF/s", "ops"]
    lines = [" | ".join(cols)]
    for r in results:
        if "ms" not in r:
            lines.append(f"{r['case']} | {r['floor_keep_ratio']} | skipped: {r.get('skipped')}")
            continue
        t = r["ms"]
        vals = [r["case"], r["cluster_kernel"], f"{r['floor_keep_ratio']:.2f}", f"{r['density']:.3f}",
                f"{r['recall']:.3f}", f"{r['rel_err_sampled']:.1e}"]
        vals += [f"{t[c]:.2f}" if c in t else "-" for c in ("cluster", "refresh", "select", "permute", "plan",
                                                            "sparse_attn", "svoo_reuse", "svoo_recluster", "dense")]
        vals += [f"{r['speedup_reuse']:.2f}", f"{r['speedup_recluster']:.2f}", f"{r['reuse_overhead_share']:.2f}",
                 f"{r['sparse_effective_tflops']:.0f}", f"{r['gpu_ops_reuse']}"]
        lines.append(" | ".join(vals))
    return "\n".join(lines)


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--cases", default="wan480,wan720")
    ap.add_argument("--floors", default="0.15,0.20", help="profile keep ratios (clipped to 0.15-0.20)")
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--q-clusters", type=int, default=256)
    ap.add_argument("--k-clusters", type=int, default=1024)
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--centers", type=int, default=64, help="cluster centres of the synthetic q/k per head")
    ap.add_argument("--recall-queries", type=int, default=256)
    ap.add_argument("--sweep", action="store_true", help="also time the cluster kernel's launch configs (first case)")
    ap.add_argument("--cluster-kernel", choices=("auto", "hopper", "portable", "both"), default="auto",
                    help="cluster kernel to time (auto: the one SVOO picks; both: hopper then portable, A/B)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--time-budget", type=float, default=170.0, help="seconds; later cases are skipped")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU with the reference backend")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        args.cases, args.heads, args.head_dim, args.centers = "smoke", 2, 32, 6
        args.q_clusters, args.k_clusters, args.reps = 8, 16, 1
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            ap.error("needs CUDA (use --cpu-smoke for a CPU dry run)")
        device, dtype = torch.device("cuda"), torch.bfloat16
    os.makedirs(args.out, exist_ok=True)
    measure = timer(device, args.reps)
    start = time.time()
    results: List[Dict[str, object]] = []
    for floor in (float(x) for x in args.floors.split(",")):
        for name in args.cases.split(","):
            if time.time() - start > args.time_budget:
                results.append({"case": name, "floor_keep_ratio": floor, "skipped": "time budget"})
                continue
            results.append(run_case(name, floor, args, device, dtype, measure))
            print(table(results[-1:]).splitlines()[-1], flush=True)
    import triton

    doc = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "triton": triton.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "command": " ".join(["python3", *sys.argv]), "results": results}
    with open(os.path.join(args.out, "svoo_bench.json"), "w") as f:
        json.dump(doc, f, indent=2)
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
