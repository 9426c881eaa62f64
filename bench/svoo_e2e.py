#!/usr/bin/env python3
"""One Wan 2.1 1.3B-shaped denoising step (transformer forward, batch 1, random bf16 weights) with SVOO
through the diffusers shim vs dense cuDNN SDPA, at 720x1280 x 81 frames (75,600 video tokens) by default.

Ways, timed with CUDA events (median of ``--repeats`` after a warm-up):

* ``dense_cudnn``  diffusers' default processors inside ``sdpa_kernel(SDPBackend.CUDNN_ATTENTION)``;
* ``svoo_reuse``   ``enable_svoo(model, backend="triton", ...)`` on a step that reuses the cached clusters
                   (every layer refreshes centroids, selects blocks and plans on the device);
* ``svoo_recluster`` the first step of a generation: every layer co-clusters from scratch.

The shim derives the denoising step from the timestep: a rising timestep starts a new generation
(clusters dropped), a falling one is the next step. Profile floor: one keep ratio for every
(step, layer, head) (``--floor``, clipped to the published Wan 1.3B band 0.15-0.20 unless ``--no-clip``).
Random weights give nearly uniform attention, so the selected density depends on ``--top-p`` far more than
with trained weights (where the paper's premise is peaked attention); the mean/min/max token density of
the layers' block maps is reported with every run.

    python3 bench/svoo_e2e.py --out "$OUT" [--frames 81] [--height 720 --width 1280] [--floor 0.15]
    python3 bench/svoo_e2e.py --device cpu --tiny --out /tmp/svoo_e2e     # CPU dry run (interpreter)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Dict, List

import torch

from lvsa_kernels.bench.e2e_step import WAN_1_3B, WAN_TINY, build, wan_inputs
from lvsa_kernels.timing import median_seconds


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--floor", type=float, default=0.15, help="profile keep ratio of every head")
    ap.add_argument("--no-clip", action="store_true", help="do not clip the floor to 0.15-0.20")
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny Wan config at 64x64 (CPU dry run)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and not args.tiny:
        ap.error("the CPU runs the Triton interpreter: use --tiny")

    from diffusers import WanTransformer3DModel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lvsa_kernels.diffusers import disable_lvsa, enable_svoo
    from lvsa_kernels.reference.svoo_profile import SVOOProfile

    config = WAN_TINY if args.tiny else WAN_1_3B
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    height, width = (64, 64) if args.tiny else (args.height, args.width)
    model = build(WanTransformer3DModel, config, device, dtype)
    inputs = wan_inputs(config, args.frames, height, width, device, dtype)
    layers, heads = config["num_layers"], config["num_attention_heads"]
    import diffusers
    import triton

    res: Dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                           "torch": torch.__version__, "triton": triton.__version__,
                           "diffusers": diffusers.__version__,
                           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "command": " ".join(["python3", *sys.argv]), "frames": args.frames, "resolution": [height, width],
                           "floor": args.floor, "top_p": args.top_p, "repeats": args.repeats}

    def forward(t: float) -> torch.Tensor:
        with torch.no_grad():
            return model(**dict(inputs, timestep=torch.tensor([t], device=device)))[0]

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION if device.type == "cuda" else SDPBackend.MATH):
        dense_out = forward(999.0)
        res["dense_cudnn_s"] = median_seconds(lambda: forward(999.0), device, args.repeats, warmup=0)

    clip = (0.0, 1.0) if args.no_clip else (0.15, 0.20)
    profile = SVOOProfile(torch.full((args.repeats + 2, layers, heads), args.floor))
    handle = enable_svoo(model, backend="triton", profile=profile, top_p=args.top_p, warmup_steps=0,
                         recluster_every=10**6, clip=clip, **({"q_clusters": 8, "k_clusters": 16} if args.tiny else {}))
    try:
        forward(999.0)  # warm-up: compiles the kernels (a new generation: clusters every layer)
        recluster = median_seconds(lambda: forward(999.0), device, max(1, args.repeats // 2), warmup=0)
        sparse_out = forward(998.0)
        reuse = median_seconds(forward, device, args.repeats, warmup=0, args=lambda i: (997.0 - i,))
        densities = [d for (_, branch), d in handle.runtime.pattern.cached_densities().items() if branch == 0]
    finally:
        disable_lvsa(model)
    res.update(density_mean=statistics.mean(densities), density_min=min(densities), density_max=max(densities))
    res.update(svoo_recluster_s=recluster, svoo_reuse_s=reuse)
    res["speedup_reuse"] = res["dense_cudnn_s"] / res["svoo_reuse_s"]
    res["speedup_recluster"] = res["dense_cudnn_s"] / res["svoo_recluster_s"]
    d, s = dense_out.float(), sparse_out.float()
    res["rel_diff_vs_dense"] = float((s - d).norm() / d.norm())
    res["nonfinite"] = int((~torch.isfinite(s)).sum())
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "svoo_e2e.json"), "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
