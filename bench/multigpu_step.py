#!/usr/bin/env python3
"""Multi-GPU denoising step: one Wan 2.1 1.3B-shaped transformer forward under diffusers' Ulysses context
parallelism, LVSA vs dense, compared with the same step on one GPU.

Launch with torchrun, first on one GPU (writes the reference outputs and times), then on N GPUs:

    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc_per_node 1 bench/multigpu_step.py --ref cp_ref.pt --json-out cp1.json
    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc_per_node 2 bench/multigpu_step.py --ref cp_ref.pt --json-out cp2.json

Each rank builds the real Wan 2.1 1.3B config with random bf16 weights (seed 0; rank 0's weights and
inputs are broadcast so every rank holds the same), 481 video frames at 480x832 (latent 121x60x104,
188,760 tokens), 512 text tokens. With N > 1 ranks: ``enable_parallelism(ContextParallelConfig(
ulysses_degree=N))``. Two ways, each a warm-up then the median of ``--repeats`` barrier-to-barrier steps:

* ``lvsa``  ``enable_lvsa(transformer, backend=--backend)`` with the default pattern (kfi 9 at T = 121);
* ``dense`` diffusers' ``--dense-backend`` (``_native_cudnn``: cuDNN SDPA, with diffusers' own Ulysses);
* ``svoo``  ``enable_svoo(transformer, backend=--backend, top_p=--svoo-top-p)``, floor 0.15 for every head:
  the warm-up clusters every layer, the timed steps (falling timesteps) reuse the clusters. Random weights
  give nearly uniform attention, so ``--svoo-top-p`` (default 0.3) sets the density (reported).

With N > 1, rank 0's output is compared with the one-GPU output in ``--ref`` (``rel_diff`` = max |a - b| /
max |b|, must be <= ``--tolerance``), and ``efficiency`` = t_1 / (N * t_N). NVLink multicast stays off:
``NCCL_NVLS_ENABLE=0`` and ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` are set when unset, other values refused.
A CPU dry run of the same logic on gloo (tiny config, reference backend) checks the outputs only: its JSON says
``"dry_run": true`` and holds no speedup or efficiency (N processes sharing a few CPU cores measure nothing
about scaling):

    torchrun --standalone --nproc_per_node 1 bench/multigpu_step.py --device cpu --tiny --ref /tmp/r.pt
    torchrun --standalone --nproc_per_node 2 bench/multigpu_step.py --device cpu --tiny --ref /tmp/r.pt
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence
from unittest import mock

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lvsa_kernels.bench.e2e_step import TINY_KNOBS, WAN_1_3B, WAN_TINY, build, wan_inputs
from lvsa_kernels.reference import latent_frames
from lvsa_kernels.timing import synchronize, wall_seconds

WAYS = ("lvsa", "dense", "svoo")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, help="video frames (default 481 -> T = 121; tiny 17 -> T = 5, sparse)")
    p.add_argument("--ref", required=True,
                   help="one-GPU reference file: written by a 1-rank run, read by an N-rank run")
    p.add_argument("--json-out", help="results JSON (rank 0 writes it after every way)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per way after one warm-up (median)")
    p.add_argument("--backend", help="enable_lvsa backend (default triton; tiny: reference)")
    p.add_argument("--dense-backend", help="diffusers attention backend for dense (default _native_cudnn; "
                                           "CPU: native)")
    p.add_argument("--ways", nargs="+", choices=WAYS, default=["lvsa", "dense"])
    p.add_argument("--svoo-top-p", type=float, default=0.3, help="top_p of the svoo way")
    p.add_argument("--tolerance", type=float, default=1e-2, help="max rel_diff vs the one-GPU output (bf16)")
    p.add_argument("--time-budget", type=float, default=float("inf"),
                   help="seconds; ways not started before it runs out are skipped (rank 0's clock decides)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="tiny config at 64x64 pixels, float32 (CPU dry run)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    args.frames = args.frames or (17 if args.tiny else 481)
    args.backend = args.backend or ("reference" if args.tiny else "triton")
    args.dense_backend = args.dense_backend or ("_native_cudnn" if args.device == "cuda" else "native")
    return args


def init_distributed(device_type: str) -> torch.device:
    """Join the torchrun group (NCCL on CUDA with NVLink multicast off: ``NCCL_NVLS_ENABLE=0`` and
    ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``, set when unset; gloo on CPU); returns this rank's device."""
    if "RANK" not in os.environ:
        raise SystemExit("multigpu_step: launch with torchrun (see the module docstring)")
    local_rank = int(os.environ["LOCAL_RANK"])
    timeout = datetime.timedelta(minutes=10)
    if device_type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
        dist.init_process_group("gloo", timeout=timeout)
        return torch.device("cpu")
    for name, off in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")):
        if os.environ.setdefault(name, off) != off:
            raise SystemExit(f"multigpu_step: {name}={os.environ[name]}; NVLink multicast must stay off "
                             f"({name}={off})")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", timeout=timeout, device_id=device)
    return device


@contextlib.contextmanager
def accelerator_count_for_cpu(device: torch.device) -> Iterator[None]:
    """diffusers 0.42.1 sets the CP device to ``rank % torch.accelerator.device_count()``, a division by zero
    without an accelerator; on CPU count 1 (the mesh is still built on "cpu")."""
    if device.type != "cpu":
        yield
        return
    with mock.patch.object(torch.accelerator, "device_count", return_value=1):
        yield


def agree(go: bool, device: torch.device) -> bool:
    """Rank 0's decision, the same on every rank (a skipped way must be skipped everywhere)."""
    flag = torch.tensor([int(go)], device=device)
    dist.broadcast(flag, 0)
    return bool(flag.item())


def broadcast_state(model: nn.Module, inputs: Dict[str, Any]) -> None:
    """Rank 0's weights and inputs on every rank."""
    for tensor in [*model.parameters(), *model.buffers(), *(v for v in inputs.values() if isinstance(v, Tensor))]:
        dist.broadcast(tensor.data, 0)


def checksum(model: nn.Module) -> float:
    """Sum of all weights in float64: equal on the one-GPU and the N-GPU runs when the weights are."""
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def timed_step(model: nn.Module, inputs: Dict[str, Any], repeats: int, device: torch.device,
               falling_timesteps: bool = False) -> Dict[str, Any]:
    """Warm-up, then ``repeats`` steps timed from a barrier to a barrier after every rank synchronised.

    ``falling_timesteps``: each call gets a timestep one below the previous one (a new denoising step)."""
    calls = iter(range(repeats + 1))

    def step_inputs() -> Dict[str, Any]:
        i = next(calls)
        if not falling_timesteps:
            return inputs
        return dict(inputs, timestep=inputs["timestep"] - i)

    def sync() -> None:
        synchronize(device)
        dist.barrier()

    outs: List[Tensor] = []

    def step() -> None:
        outs[:] = [model(**step_inputs())[0]]

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        times = wall_seconds(step, sync, repeats, warmup=1)
    rec: Dict[str, Any] = {"status": "ok", "seconds": statistics.median(times), "all_seconds": times,
                           "output": outs[0]}
    if device.type == "cuda":
        peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30], device=device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        rec["peak_gib_max_rank"] = float(peak.item())
    return rec


def rel_diff(out: Tensor, ref: Tensor) -> float:
    a, b = out.float().cpu(), ref.float().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def run_way(way: str, model: nn.Module, inputs: Dict[str, Any], args: argparse.Namespace,
            device: torch.device) -> Dict[str, Any]:
    """One way's record (seconds, memory, output); LVSA is installed for its run only."""
    from lvsa_kernels.diffusers import enable_lvsa, enable_svoo
    from lvsa_kernels.reference.svoo_profile import SVOOProfile

    if way == "dense":
        return timed_step(model, inputs, args.repeats, device)
    if way == "svoo":
        cfg = model.config
        profile = SVOOProfile(torch.full((args.repeats + 2, cfg["num_layers"], cfg["num_attention_heads"]), 0.15))
        tiny = {"q_clusters": 8, "k_clusters": 16} if args.tiny else {}
        handle = enable_svoo(model, backend=args.backend, profile=profile, top_p=args.svoo_top_p, warmup_steps=0,
                             recluster_every=10**6, **tiny)
        try:
            rec = timed_step(model, inputs, args.repeats, device, falling_timesteps=True)
            densities = handle.runtime.pattern.cached_densities().values()
        finally:
            handle.disable()
        rec.update(top_p=args.svoo_top_p, density_mean=statistics.mean(densities), backend=args.backend)
        return rec
    handle = enable_lvsa(model, backend=args.backend, **(TINY_KNOBS if args.tiny else {}))
    try:
        rec = timed_step(model, inputs, args.repeats, device)
    finally:
        handle.disable()
    pattern = handle.runtime.pattern
    t = latent_frames(args.frames)
    rec.update(kfi=pattern.key_frame_interval_for(t), frame_density=float(pattern.frame_mask(t).float().mean()),
               backend=args.backend)
    return rec


def record(way: str, rec: Dict[str, Any], out: Tensor, reference: Optional[Dict[str, Any]], saved: Dict[str, Any],
           tolerance: float, meta: Dict[str, Any]) -> None:
    """Keep rank 0's one-GPU output of ``way`` in ``saved``; on N ranks add to ``rec`` its difference from the
    one-GPU output in ``reference`` (``rel_diff_vs_1gpu``, ``matches_1gpu``) and, outside a dry run, the one-GPU
    seconds, the speedup and the efficiency t_1 / (N * t_N)."""
    world = meta["world_size"]
    if world == 1 and dist.get_rank() == 0:
        saved[way] = {"output": out.cpu(), "seconds": rec["seconds"]}
    if reference is None or way not in reference:
        return
    ref = reference[way]
    rec["rel_diff_vs_1gpu"] = rel_diff(out, ref["output"])
    rec["matches_1gpu"] = rec["rel_diff_vs_1gpu"] <= tolerance
    if not meta["dry_run"]:
        rec["seconds_1gpu"] = ref["seconds"]
        rec["speedup_vs_1gpu"] = ref["seconds"] / rec["seconds"]
        rec["efficiency"] = rec["speedup_vs_1gpu"] / world


def publish(script: str, what: str, rec: Dict[str, Any], meta: Dict[str, Any], results: Dict[str, Any],
            saved: Dict[str, Any], args: argparse.Namespace) -> None:
    """Rank 0, after each way: print its record (``[script] what: {...}``), write the reference file (one GPU)
    and the JSON so far."""
    dry = " DRY RUN (CPU/gloo: checks outputs; times are not scaling measurements)" if meta["dry_run"] else ""
    print(f"[{script}]{dry} {what}: " + json.dumps(rec), flush=True)
    if meta["world_size"] == 1:
        torch.save(saved, args.ref)
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as fh:
            json.dump({"meta": meta, "results": results}, fh, indent=2)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    import diffusers
    from diffusers import ContextParallelConfig, WanTransformer3DModel

    device = init_distributed(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    deadline = time.monotonic() + args.time_budget
    dtype = torch.float32 if args.tiny else torch.bfloat16
    config = WAN_TINY if args.tiny else WAN_1_3B
    frames = args.frames
    height, width = (64, 64) if args.tiny else (480, 832)

    model = build(WanTransformer3DModel, config, device, dtype)
    inputs = wan_inputs(config, frames, height, width, device, dtype)
    broadcast_state(model, inputs)
    model.set_attention_backend(args.dense_backend)
    if world > 1:
        with accelerator_count_for_cpu(device):
            model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))

    reference: Optional[Dict[str, Any]] = None
    if world > 1 and rank == 0:
        reference = torch.load(args.ref, map_location="cpu", weights_only=False)
        if (reference["frames"], reference["tiny"]) != (frames, args.tiny):
            raise SystemExit(f"multigpu_step: {args.ref} holds frames={reference['frames']} tiny={reference['tiny']}; "
                             f"this run has frames={frames} tiny={args.tiny}")
    t = latent_frames(frames)
    p = (height // 8 // config["patch_size"][1]) * (width // 8 // config["patch_size"][2])
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "world_size": world, "ulysses_degree": world, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "nccl": ".".join(map(str, torch.cuda.nccl.version()))
            if device.type == "cuda" else None, "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE"),
            "dtype": str(dtype), "frames": frames, "latent_frames": t, "tokens": t * p, "resolution": [height, width],
            "dense_backend": args.dense_backend, "lvsa_backend": args.backend, "repeats": args.repeats,
            "weights_checksum": checksum(model), "command": " ".join(sys.argv), "dry_run": device.type == "cpu"}
    if reference is not None:
        meta["weights_match_reference"] = meta["weights_checksum"] == reference["weights_checksum"]
    results: Dict[str, Any] = {}
    saved: Dict[str, Any] = {"frames": frames, "tiny": args.tiny, "weights_checksum": meta["weights_checksum"]}

    for way in args.ways:
        if not agree(time.monotonic() < deadline, device):
            results[way] = {"status": "skipped: --time-budget exceeded"}
            continue
        rec = run_way(way, model, inputs, args, device)
        record(way, rec, rec.pop("output"), reference, saved, args.tolerance, meta)
        results[way] = rec
        if rank == 0:
            publish("multigpu_step", f"world={world} {way}", rec, meta, results, saved, args)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
