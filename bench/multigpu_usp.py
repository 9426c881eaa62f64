#!/usr/bin/env python3
"""Multi-GPU Wan 14B-shaped blocks under ring / Ulysses x ring (USP) context parallelism, LVSA vs dense.

A few transformer blocks (``--layers``, default 4) of the Wan 14B config (40 heads x 128, ffn 13824, random bf16
weights, seed 0, rank 0's broadcast to all) at 720p (latent 90x160: 3,600 tokens per latent frame) and 481
video frames (121 latent frames, 435,600 tokens), 512 text tokens. With N > 1 ranks:
``enable_parallelism(ContextParallelConfig(ring_degree=R, ulysses_degree=U))`` with ``R * U = N`` (default
``R = N / U``, ``U = --ulysses-degree`` = 1: pure ring). Two ways, a warm-up then the median of ``--repeats``
barrier-to-barrier steps (the timer and the comparison of `bench/multigpu_step.py`):

* ``lvsa``  ``enable_lvsa(transformer, backend=--backend)``, the default pattern (W = 3, kfi 9 at T = 121) and,
  with R > 1, the layout-aware ring (each rank receives only the key frames its queries read);
* ``dense`` diffusers' ``--dense-backend`` (``_native_cudnn``: cuDNN SDPA, with diffusers' own ring / USP).

Run first on one GPU (writes ``--ref``), then on 2, 4, 8 (reads it): rank 0's output is compared with the
one-GPU output (``rel_diff`` = max |a - b| / max |b| <= ``--tolerance``) and ``efficiency`` = t_1 / (N * t_N).
The LVSA record holds the ring's key/value traffic (all ranks' bytes vs a dense ring's, from
``runtime.ring_traffic``) and ``planned_traffic_ratio`` computed from the layout alone. NVLink multicast stays
off: ``NCCL_NVLS_ENABLE=0`` and ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` are set when unset, other values refused.

    torchrun --standalone --nproc_per_node 1 bench/multigpu_usp.py --ref usp_ref.pt --json-out usp1.json
    torchrun --standalone --nproc_per_node 8 bench/multigpu_usp.py --ref usp_ref.pt --json-out usp8.json
    torchrun --standalone --nproc_per_node 8 bench/multigpu_usp.py --ref usp_ref.pt --ulysses-degree 2 ...
    torchrun --standalone --nproc_per_node 2 bench/multigpu_usp.py --device cpu --tiny --ref /tmp/r.pt   # dry run

The CPU runs (gloo, tiny config, reference backend) check outputs only (``"dry_run": true``, no efficiency);
diffusers' dense ring needs a backend returning lse (cuDNN, flash), which the CPU lacks, so there the dense way
runs only without ring attention.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from lvsa_kernels.bench.e2e_step import TINY_KNOBS, WAN_1_3B, WAN_TINY, build, wan_inputs
from lvsa_kernels.bench.multigpu_step import (accelerator_count_for_cpu, agree, broadcast_state, checksum,
                                              init_distributed, publish, record, timed_step)
from lvsa_kernels.reference import latent_frames

WAYS = ("lvsa", "dense")
WAN_14B = dict(WAN_1_3B, num_attention_heads=40, ffn_dim=13824)  # 40 x 128 = 5120 channels


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref", required=True, help="one-GPU reference file: written by a 1-rank run, read by N ranks")
    p.add_argument("--json-out", help="results JSON (rank 0 writes it after every way)")
    p.add_argument("--layers", type=int, default=4, help="transformer blocks (Wan 14B has 40)")
    p.add_argument("--frames", type=int, help="video frames (default 481 -> T = 121; tiny 17 -> T = 5)")
    p.add_argument("--height", type=int, help="pixels (default 720; tiny 64)")
    p.add_argument("--width", type=int, help="pixels (default 1280; tiny 64)")
    p.add_argument("--ulysses-degree", type=int, default=1, help="U; the ring degree is world size / U")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per way after one warm-up (median)")
    p.add_argument("--backend", help="enable_lvsa backend (default triton; tiny: reference)")
    p.add_argument("--dense-backend", help="diffusers backend for dense (default _native_cudnn; CPU: native)")
    p.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS))
    p.add_argument("--tolerance", type=float, default=1e-2, help="max rel_diff vs the one-GPU output (bf16)")
    p.add_argument("--time-budget", type=float, default=float("inf"),
                   help="seconds; ways not started before it runs out are skipped (rank 0's clock decides)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="tiny config (4 heads x 16) at 64x64 pixels, float32")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.layers < 1 or args.ulysses_degree < 1:
        p.error("--repeats, --layers and --ulysses-degree must be >= 1")
    args.frames = args.frames or (17 if args.tiny else 481)
    args.height = args.height or (64 if args.tiny else 720)
    args.width = args.width or (64 if args.tiny else 1280)
    args.backend = args.backend or ("reference" if args.tiny else "triton")
    args.dense_backend = args.dense_backend or ("_native_cudnn" if args.device == "cuda" else "native")
    return args


def model_config(args: argparse.Namespace) -> Dict[str, Any]:
    """The Wan 14B config with ``--layers`` blocks (tiny: 4 heads x 16, so that Ulysses degrees 2 and 4 fit)."""
    base = dict(WAN_TINY, num_attention_heads=4) if args.tiny else WAN_14B
    return dict(base, num_layers=args.layers)


def degrees(world: int, ulysses: int, heads: int) -> Tuple[int, int]:
    """``(ring_degree, ulysses_degree)`` for ``world`` ranks; raises when U does not divide the world or the heads."""
    if world % ulysses:
        raise ValueError(f"--ulysses-degree {ulysses} does not divide the world size {world}")
    if heads % ulysses:
        raise ValueError(f"--ulysses-degree {ulysses} does not divide the {heads} attention heads")
    return world // ulysses, ulysses


def grid(config: Dict[str, Any], frames: int, height: int, width: int) -> Tuple[int, int]:
    """``(T, P)``: latent frames and tokens per latent frame after the (1, 2, 2) patch (VAE: 4x time, 8x space)."""
    p = config["patch_size"]
    return latent_frames(frames) // p[0], (height // 8 // p[1]) * (width // 8 // p[2])


def planned_traffic_ratio(frames: int, tokens_per_frame: int, ring: int, knobs: Dict[str, Any]) -> Optional[float]:
    """The layout-aware ring's traffic vs a dense ring's for the default Wan pattern at step 0 (None without ring)."""
    if ring == 1:
        return None
    from lvsa_kernels.models import get_model
    from lvsa_kernels.ring import SequenceShards, ring_plan

    layout = get_model("wan").pattern(**knobs).plan(frames, tokens_per_frame, step=0)
    return ring_plan(layout, SequenceShards.split(layout.q_len, ring)).traffic().ratio


def run_way(way: str, model: nn.Module, inputs: Dict[str, Any], args: argparse.Namespace, device: torch.device,
            ring: int) -> Dict[str, Any]:
    """One way's record (seconds, memory, output; LVSA: pattern and ring traffic). LVSA is on for its run only."""
    from lvsa_kernels.diffusers import enable_lvsa

    if way == "dense":
        if ring > 1 and device.type == "cpu":
            return {"status": f"skipped: diffusers' dense ring (ring_degree={ring}) needs a backend returning lse "
                              "(cuDNN, flash); none runs on the CPU"}
        return timed_step(model, inputs, args.repeats, device)
    handle = enable_lvsa(model, backend=args.backend, **(TINY_KNOBS if args.tiny else {}))
    try:
        rec = timed_step(model, inputs, args.repeats, device)
    finally:
        handle.disable()
    runtime = handle.runtime
    t = latent_frames(args.frames)
    rec.update(kfi=runtime.pattern.key_frame_interval_for(t), backend=args.backend,
               frame_density=float(runtime.pattern.frame_mask(t).float().mean()))
    if ring > 1:
        sent = torch.tensor([runtime.ring_traffic.sent_bytes, runtime.ring_traffic.dense_bytes], dtype=torch.float64,
                            device=device)
        dist.all_reduce(sent)
        steps = args.repeats + 1
        rec.update(ring_sent_gib_per_step=float(sent[0]) / steps / 2**30,
                   dense_ring_gib_per_step=float(sent[1]) / steps / 2**30,
                   ring_traffic_ratio=float(sent[0] / sent[1]))
    return rec


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    import diffusers
    from diffusers import ContextParallelConfig, WanTransformer3DModel

    device = init_distributed(args.device)  # CUDA: NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1
    rank, world = dist.get_rank(), dist.get_world_size()
    deadline = time.monotonic() + args.time_budget
    dtype = torch.float32 if args.tiny else torch.bfloat16
    config = model_config(args)
    ring, ulysses = degrees(world, args.ulysses_degree, config["num_attention_heads"])
    model = build(WanTransformer3DModel, config, device, dtype)
    inputs = wan_inputs(config, args.frames, args.height, args.width, device, dtype)
    broadcast_state(model, inputs)
    model.set_attention_backend(args.dense_backend)
    if world > 1:
        with accelerator_count_for_cpu(device):
            model.enable_parallelism(config=ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses))

    reference: Optional[Dict[str, Any]] = None
    if world > 1 and rank == 0:
        reference = torch.load(args.ref, map_location="cpu", weights_only=False)
        key = (args.frames, args.height, args.width, args.layers, args.tiny)
        if reference["key"] != key:
            raise SystemExit(f"multigpu_usp: {args.ref} holds (frames, height, width, layers, tiny) = "
                             f"{reference['key']}; this run has {key}")
    t, p = grid(config, args.frames, args.height, args.width)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "world_size": world, "ring_degree": ring, "ulysses_degree": ulysses, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "nccl": ".".join(map(str, torch.cuda.nccl.version()))
            if device.type == "cuda" else None, "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE"),
            "TORCH_SYMM_MEM_DISABLE_MULTICAST": os.environ.get("TORCH_SYMM_MEM_DISABLE_MULTICAST"),
            "dtype": str(dtype), "heads": config["num_attention_heads"], "head_dim": config["attention_head_dim"],
            "layers": args.layers, "frames": args.frames, "latent_frames": t, "tokens_per_frame": p, "tokens": t * p,
            "resolution": [args.height, args.width], "dense_backend": args.dense_backend, "lvsa_backend": args.backend,
            "repeats": args.repeats, "weights_checksum": checksum(model), "command": " ".join(sys.argv),
            "dry_run": device.type == "cpu",
            "planned_traffic_ratio": planned_traffic_ratio(t, p, ring, TINY_KNOBS if args.tiny else {})}
    if reference is not None:
        meta["weights_match_reference"] = meta["weights_checksum"] == reference["weights_checksum"]
    results: Dict[str, Any] = {}
    saved: Dict[str, Any] = {"key": (args.frames, args.height, args.width, args.layers, args.tiny),
                             "weights_checksum": meta["weights_checksum"]}
    for way in args.ways:
        if not agree(time.monotonic() < deadline, device):
            results[way] = {"status": "skipped: --time-budget exceeded"}
            continue
        rec = run_way(way, model, inputs, args, device, ring)
        if "output" in rec:
            record(way, rec, rec.pop("output"), reference, saved, args.tolerance, meta)
        results[way] = rec
        if rank == 0:
            publish("multigpu_usp", f"world={world} ring={ring} ulysses={ulysses} {way}", rec, meta, results, saved,
                    args)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    status = main()
    # Leave without interpreter teardown: the process group is gone and every output is written, yet a 2-rank
    # gloo run on CPU was seen to abort in C++ destructors at exit ("terminate called without an active
    # exception") after finishing its work, failing the run that had succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
