#!/usr/bin/env python3
"""End-to-end denoising-step benchmark: one transformer forward (batch 1), dense vs LVSA, random weights;
or (``--train``) one training step.

Wan 2.1 1.3B-shaped ``WanTransformer3DModel`` (real config, random bf16 weights) at 480x832 and 81 / 161 /
321 / 481 video frames (latent T = 21 / 41 / 81 / 121, 60x104 latents, 512 text tokens of dim 4096);
optionally (``--hunyuan``) HunyuanVideo 1.5 480p-shaped (8.3B parameters, 16 GB in bf16) at 129 / 193 frames.
Three ways per size, median of ``--repeats`` runs after one warm-up, timed with CUDA events:

* ``dense_cudnn``   diffusers' default processors inside ``sdpa_kernel(SDPBackend.CUDNN_ATTENTION)``;
* ``dense_default`` diffusers' default dispatch (``native`` SDPA, PyTorch picks the kernel);
* ``lvsa``          ``enable_lvsa(transformer, backend=--backend)`` with the model's default pattern;
* ``lvsa_fp8`` / ``lvsa_int8_qk`` with ``--precision``: the same at that 8-bit precision (docs/fp8.md).

``rel_diff`` = max |lvsa - dense| / max |dense| on the transformer output; it must be tiny where the
pattern is dense (Wan T = 21, HunyuanVideo T = 33) and is a pattern effect elsewhere. With ``--precision``,
``rel_diff_8bit_vs_lvsa`` (same metric) and ``rel_l2_8bit_vs_lvsa`` (||8-bit - lvsa|| / ||lvsa||) compare the
8-bit step output with the exact LVSA step: the error the quantization adds to one denoising step.

``--train`` (Wan only; default 321 frames = T 81, 2 repeats, ``dense_default`` off) times one training step
instead: forward with grad, loss = MSE(output in float32, a fixed random target of the latents' shape, as
flow matching's velocity target), ``backward()``; no optimizer step. Full fine-tuning: every weight requires grad
(bf16 weights get bf16 gradients, ``_keep_in_fp32_modules`` float32 ones), gradients reset before each step.
Both ways run with diffusers' ``enable_gradient_checkpointing()`` (each transformer block recomputed in the
backward: the same recompute cost on both sides; without it 126k tokens x 30 layers of activations do not
fit). Per way: ``seconds`` (whole step), ``forward_seconds`` (forward + loss) and ``backward_seconds`` (backward
with the recomputation), medians over the same steps, ``peak_gib``, ``loss``, ``nonfinite_grads`` (non-finite
gradient entries over all weights). Per row: ``rel_diff_loss`` = |loss_lvsa - loss_dense| / |loss_dense| and
``rel_l2_grad`` = ||g_lvsa - g_dense|| / ||g_dense|| of ``grad_probe``'s gradient (pattern effects, not errors).

    python bench/e2e_step.py [--frames 81 161 321 481] [--repeats 3] [--backend triton]
                             [--json-out e2e_step.json] [--time-budget 1500] [--hunyuan] [--precision fp8]
    python bench/e2e_step.py --train [--frames 321] [--repeats 2] --json-out e2e_train.json
    python bench/e2e_step.py --device cpu --tiny [--train]   # CPU dry run on tiny configs (seconds;
                                                             # TRITON_INTERPRET=1 for the triton backend)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
import traceback
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lvsa_kernels.reference import latent_frames
from lvsa_kernels.timing import median_seconds, synchronize

WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6)
WAN_TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
HV15_480P = dict(in_channels=65, out_channels=32, num_attention_heads=16, attention_head_dim=128, num_layers=54,
                 num_refiner_layers=2, mlp_ratio=4.0, patch_size=1, patch_size_t=1, qk_norm="rms_norm",
                 text_embed_dim=3584, text_embed_2_dim=1472, image_embed_dim=1152, rope_theta=256.0,
                 rope_axes_dim=(16, 56, 56), target_size=640, task_type="t2v")
HV15_TINY = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                 num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16,
                 text_embed_2_dim=8, image_embed_dim=12, rope_axes_dim=(4, 6, 6), task_type="t2v")
# tiny configs use head_dim 16, the smallest the Triton kernels take
# HunyuanVideo 1.5 pipeline text layout: 1000 MLLM + 256 ByT5 + 729 image tokens, mostly padding in T2V
HV15_TEXT = dict(mllm=1000, mllm_valid=128, byt5=256, byt5_valid=0, image=729)
HV15_TEXT_TINY = dict(mllm=6, mllm_valid=4, byt5=3, byt5_valid=1, image=2)
TINY_KNOBS = dict(reference_frames=2, window=1)  # --tiny: make the tiny sizes sparse so the LVSA path runs
GRAD_PROBE = "blocks.0.attn1.to_q.weight"  # --train: its gradient passes through every layer's attention


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build(cls: type, config: Dict[str, Any], device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Random-weight model created directly on ``device`` in ``dtype``; ``_keep_in_fp32_modules`` stay
    float32 as ``from_pretrained`` keeps them."""
    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):
        model = cls(**config)
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, module in model.named_modules():
        if any(k in name.split(".") for k in keep):
            module.to(torch.float32)
    return model.eval().requires_grad_(False)


def trainable(model: nn.Module) -> nn.Module:
    """``model`` (from `build`) set up for full fine-tuning: train mode, every weight requires grad, diffusers'
    gradient checkpointing of each transformer block."""
    model.train().requires_grad_(True)
    model.enable_gradient_checkpointing()
    return model


def wan_inputs(config: Dict[str, Any], frames: int, height: int, width: int, device: torch.device,
               dtype: torch.dtype) -> Dict[str, Any]:
    g = torch.Generator(device).manual_seed(1)
    text = 512 if config["text_dim"] == 4096 else 12
    return dict(hidden_states=torch.randn(1, config["in_channels"], latent_frames(frames), height // 8, width // 8,
                                          generator=g, device=device, dtype=dtype),
                timestep=torch.tensor([999.0], device=device),
                encoder_hidden_states=torch.randn(1, text, config["text_dim"], generator=g, device=device,
                                                  dtype=dtype),
                return_dict=False)


def hv15_inputs(config: Dict[str, Any], frames: int, height: int, width: int, device: torch.device,
                dtype: torch.dtype) -> Dict[str, Any]:
    g = torch.Generator(device).manual_seed(1)
    txt = HV15_TEXT if config["text_embed_dim"] == 3584 else HV15_TEXT_TINY

    def prefix_mask(n: int, valid: int) -> Tensor:
        return (torch.arange(n, device=device) < valid).long()[None]

    return dict(hidden_states=torch.randn(1, config["in_channels"], latent_frames(frames), height // 16, width // 16,
                                          generator=g, device=device, dtype=dtype),
                timestep=torch.tensor([999.0], device=device),
                encoder_hidden_states=torch.randn(1, txt["mllm"], config["text_embed_dim"], generator=g,
                                                  device=device, dtype=dtype),
                encoder_attention_mask=prefix_mask(txt["mllm"], txt["mllm_valid"]),
                encoder_hidden_states_2=torch.randn(1, txt["byt5"], config["text_embed_2_dim"], generator=g,
                                                    device=device, dtype=dtype),
                encoder_attention_mask_2=prefix_mask(txt["byt5"], txt["byt5_valid"]),
                image_embeds=torch.zeros(1, txt["image"], config["image_embed_dim"], device=device, dtype=dtype),
                return_dict=False)


Mark = Union[torch.cuda.Event, float]


def _mark(device: torch.device) -> Mark:
    """Now on ``device``: a recorded CUDA event, else ``perf_counter`` seconds after a synchronisation."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    synchronize(device)
    return time.perf_counter()


def _between(a: Mark, b: Mark) -> float:
    """Seconds from mark ``a`` to mark ``b`` (CUDA events must have completed)."""
    return a.elapsed_time(b) / 1e3 if isinstance(a, torch.cuda.Event) else b - a


def measure(model: nn.Module, inputs: Dict[str, Any], repeats: int, device: torch.device,
            context: Callable[[], Any], target: Optional[Tensor] = None) -> Dict[str, Any]:
    """Time one forward (no grad) under ``context``; returns seconds, peak memory and the output (or the error).

    With ``target`` (float32, the output's shape) one training step instead: forward with grad, loss =
    MSE(output.float(), target), backward (gradients reset before each step); it adds ``forward_seconds`` and
    ``backward_seconds`` (medians over the same steps), the last step's ``loss``, ``nonfinite_grads`` and
    ``probe_grad`` (`GRAD_PROBE`'s gradient, float32 on CPU), then frees the gradients.
    """
    out: List[Tensor] = []
    marks: List[Tuple[Mark, Mark, Mark]] = []

    def step() -> None:
        out[:] = [model(**inputs)[0]]

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        begin = _mark(device)
        pred = model(**inputs)[0]
        loss = F.mse_loss(pred.float(), target)
        middle = _mark(device)
        loss.backward()
        marks.append((begin, middle, _mark(device)))
        out[:] = [pred.detach(), loss.detach()]

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with (torch.no_grad() if target is None else contextlib.nullcontext()), context():
            seconds = median_seconds(step if target is None else train_step, device, repeats)
    except Exception as exc:  # one failing way (e.g. no cuDNN kernel for a mask) must not stop the sweep
        model.zero_grad(set_to_none=True)
        traceback.print_exc()  # the whole story in the log; the row keeps the first line and where it was raised
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        return {"status": "error", "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
                "raised_at": f"{frame.filename}:{frame.lineno} ({frame.name})"}
    rec: Dict[str, Any] = {"status": "ok", "seconds": seconds, "output": out[0]}
    if target is not None:
        timed = marks[-repeats:]
        rec.update(forward_seconds=statistics.median(_between(a, b) for a, b, _ in timed),
                   backward_seconds=statistics.median(_between(b, c) for _, b, c in timed), loss=float(out[1]),
                   nonfinite_grads=sum(int((~torch.isfinite(p.grad)).sum()) for p in model.parameters()
                                       if p.grad is not None),
                   probe_grad=model.get_parameter(GRAD_PROBE).grad.float().cpu())
        model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        rec["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return rec


def cudnn_context(device: torch.device) -> Callable[[], Any]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION)


def run_model(name: str, build_model: Callable[[], nn.Module], patch: Sequence[int],
              make_inputs: Callable[[int], Dict[str, Any]], frames: Sequence[int], args: argparse.Namespace,
              device: torch.device, deadline: float, on_row: Callable[[Dict[str, Any]], None]) -> None:
    """Measure the three ways at each video frame count and pass each row to ``on_row``; the model is
    built before the first size that runs; ``patch`` = (p_t, p_h, p_w). With ``args.train`` each way times a
    training step against a fixed random target shaped like ``hidden_states`` (out = in channels)."""
    from lvsa_kernels.diffusers import enable_lvsa
    from lvsa_kernels.diffusers.geometry import geometry_from_latents

    knobs = TINY_KNOBS if args.tiny else {}
    model: Optional[nn.Module] = None
    for f in frames:
        row: Dict[str, Any] = {"model": name, "frames": f}
        if time.monotonic() > deadline:
            row["status"] = "skipped: --time-budget exceeded"
            on_row(row)
            continue
        model = model if model is not None else build_model()
        inputs = make_inputs(f)
        geo = geometry_from_latents(inputs["hidden_states"], 2, patch)
        target = None
        if args.train:
            latents = inputs["hidden_states"]
            target = torch.randn(latents.shape, generator=torch.Generator(device).manual_seed(2), device=device)
        ways: Dict[str, Dict[str, Any]] = {}
        if device.type == "cuda":
            ways["dense_cudnn"] = measure(model, inputs, args.repeats, device, cudnn_context(device), target)
        else:
            ways["dense_cudnn"] = {"status": "skipped: cuDNN SDPA needs CUDA"}
        if args.dense_default or ways["dense_cudnn"]["status"] != "ok":
            ways["dense_default"] = measure(model, inputs, args.repeats, device, contextlib.nullcontext, target)
        else:
            ways["dense_default"] = {"status": "skipped: not asked (--dense-default)"}
        handle = enable_lvsa(model, backend=args.backend, **knobs)
        try:
            ways["lvsa"] = measure(model, inputs, args.repeats, device, contextlib.nullcontext, target)
        finally:
            handle.disable()
        eight_bit = f"lvsa_{args.precision}" if args.precision else None
        if eight_bit:
            handle8 = enable_lvsa(model, backend=args.backend, precision=args.precision, **knobs)
            try:
                ways[eight_bit] = measure(model, inputs, args.repeats, device, contextlib.nullcontext)
            finally:
                handle8.disable()
        pattern = handle.runtime.pattern
        row.update(latent_frames=geo.frames, tokens_per_frame=geo.tokens_per_frame, video_tokens=geo.video_tokens,
                   kfi=pattern.key_frame_interval_for(geo.frames),
                   frame_density=float(pattern.frame_mask(geo.frames).float().mean()),
                   reference_frames=pattern.reference_frames, backend=args.backend)
        if args.train:
            row.update(trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                       grad_probe=GRAD_PROBE)
        dense = ways["dense_cudnn"] if ways["dense_cudnn"]["status"] == "ok" else ways["dense_default"]
        lvsa = ways["lvsa"]
        if dense["status"] == "ok" and lvsa["status"] == "ok":
            d, s = dense["output"].float(), lvsa["output"].float()
            row["rel_diff"] = float((s - d).abs().max() / d.abs().max().clamp_min(1e-30))
            row["nonfinite"] = int((~torch.isfinite(s)).sum() + (~torch.isfinite(d)).sum())
            if args.train:
                row["rel_diff_loss"] = abs(lvsa["loss"] - dense["loss"]) / max(abs(dense["loss"]), 1e-30)
                g, h = lvsa["probe_grad"], dense["probe_grad"]
                row["rel_l2_grad"] = float((g - h).norm() / h.norm().clamp_min(1e-30))
        if eight_bit and lvsa["status"] == "ok" and ways[eight_bit]["status"] == "ok":
            e, s = ways[eight_bit]["output"].float(), lvsa["output"].float()
            row["rel_diff_8bit_vs_lvsa"] = float((e - s).abs().max() / s.abs().max().clamp_min(1e-30))
            row["rel_l2_8bit_vs_lvsa"] = float((e - s).norm() / s.norm().clamp_min(1e-30))
            row["nonfinite_8bit"] = int((~torch.isfinite(e)).sum())
            if dense["status"] == "ok":
                row["speedup_8bit_vs_dense"] = dense["seconds"] / ways[eight_bit]["seconds"]
        for way, rec in ways.items():
            rec.pop("output", None)
            rec.pop("probe_grad", None)
            row[way] = rec
            if rec["status"] == "ok" and lvsa["status"] == "ok" and way != "lvsa" and way != eight_bit:
                row[f"speedup_vs_{way}"] = rec["seconds"] / lvsa["seconds"]
        on_row(row)
        del inputs, target, ways, dense, lvsa


def _s(rec: Optional[Dict[str, Any]]) -> str:
    if not rec:
        return "-"
    return f"{rec['seconds']:.3f}" if rec["status"] == "ok" else rec["status"].split(":")[0]


def _x(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}x"


HEADER = (f"{'model':<10} {'frames':>6} {'T':>4} {'tokens':>7} {'kfi':>4} {'density':>7} {'cudnn s':>8} "
          f"{'default s':>9} {'lvsa s':>8} {'vs cudnn':>8} {'vs dflt':>8} {'rel diff':>9}")


def format_row(r: Dict[str, Any]) -> str:
    if "lvsa" not in r:
        return f"{r['model']:<10} {r['frames']:>6}  {r['status']}"
    rel = "-" if "rel_diff" not in r else f"{r['rel_diff']:.2e}"
    return (f"{r['model']:<10} {r['frames']:>6} {r['latent_frames']:>4} {r['video_tokens']:>7} {r['kfi']:>4} "
            f"{r['frame_density']:>7.3f} {_s(r.get('dense_cudnn')):>8} {_s(r.get('dense_default')):>9} "
            f"{_s(r.get('lvsa')):>8} {_x(r.get('speedup_vs_dense_cudnn')):>8} "
            f"{_x(r.get('speedup_vs_dense_default')):>8} {rel:>9}" + _eight_bit_note(r) + _train_note(r))


def _train_note(r: Dict[str, Any]) -> str:
    """Forward / backward seconds and peak GiB per way, loss and probe-gradient differences (--train rows)."""
    if "grad_probe" not in r:
        return ""
    parts = [f"{w}: fwd {r[w]['forward_seconds']:.3f} + bwd {r[w]['backward_seconds']:.3f} s"
             + (f", {r[w]['peak_gib']:.1f} GiB" if "peak_gib" in r[w] else "")
             for w in ("dense_cudnn", "dense_default", "lvsa") if r[w]["status"] == "ok"]
    if "rel_l2_grad" in r:
        parts.append(f"loss diff {r['rel_diff_loss']:.1e}, grad L2 diff {r['rel_l2_grad']:.1e}, "
                     f"non-finite grads {r['lvsa']['nonfinite_grads']}")
    return "  " + "; ".join(parts)


def _eight_bit_note(r: Dict[str, Any]) -> str:
    way = next((k for k in r if k.startswith("lvsa_")), None)
    if way is None:
        return ""
    if "rel_l2_8bit_vs_lvsa" not in r:
        return f"  {way}: {_s(r[way])}"
    return (f"  {way}: {_s(r[way])} s, {_x(r.get('speedup_8bit_vs_dense'))} vs dense, diff vs lvsa "
            f"max {r['rel_diff_8bit_vs_lvsa']:.2e} L2 {r['rel_l2_8bit_vs_lvsa']:.2e}")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, nargs="+",
                   help="Wan video frames (default 81 161 321 481, --train 321; tiny 9 17, --train 17)")
    p.add_argument("--hunyuan", action="store_true", help="also HunyuanVideo 1.5 480p-shaped (8.3B, 16 GB bf16)")
    p.add_argument("--hunyuan-frames", type=int, nargs="+", help="default 129 193; tiny 9 17")
    p.add_argument("--repeats", type=int, help="timed runs per way after one warm-up (median; default 3, --train 2)")
    p.add_argument("--dense-default", action=argparse.BooleanOptionalAction,
                   help="time the 'dense_default' way on CUDA too (default: yes, no with --train); it runs "
                        "anyway where dense_cudnn did not")
    p.add_argument("--train", action="store_true",
                   help="time a training step (forward + MSE loss + backward, all weights, gradient "
                        "checkpointing) instead of a forward; Wan only, default 321 frames")
    p.add_argument("--backend", default="triton", help="enable_lvsa backend (default triton)")
    p.add_argument("--precision", choices=("fp8", "int8_qk"),
                   help="also time LVSA at this 8-bit precision and compare its step output with the exact LVSA step")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                   help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--tiny", action="store_true", help="tiny configs at 64x64 pixels (CPU dry run)")
    p.add_argument("--time-budget", type=float, default=float("inf"),
                   help="seconds; sizes not started before it runs out are skipped")
    p.add_argument("--json-out", help="write the results as JSON to this path")
    args = p.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        p.error(f"--repeats: expected >= 1, got {args.repeats}")
    if args.train and args.hunyuan:
        p.error("--hunyuan: the training step (--train) covers Wan only")
    if args.train and args.precision:
        p.error(f"--precision {args.precision}: 8-bit attention has no backward; expected no --precision with --train")
    args.repeats = args.repeats or (2 if args.train else 3)
    if args.dense_default is None:
        args.dense_default = not args.train
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    import diffusers
    from diffusers import HunyuanVideo15Transformer3DModel, WanTransformer3DModel

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("e2e_step: CUDA is not available; use --device cpu --tiny for a dry run", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    height, width = (64, 64) if args.tiny else (480, 832)
    deadline = time.monotonic() + args.time_budget
    rows: List[Dict[str, Any]] = []
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
            "triton": _triton_version(), "diffusers": diffusers.__version__, "dtype": str(dtype),
            "resolution": [height, width], "repeats": args.repeats, "tiny": args.tiny, "train": args.train}
    if args.train:
        meta["train_step"] = dict(loss="mse(output.float(), fixed randn target)", backward="all weights (full "
                                  "fine-tuning), no optimizer step", gradient_checkpointing="diffusers "
                                  "enable_gradient_checkpointing(), every block, both ways")

    def on_row(row: Dict[str, Any]) -> None:
        """Print the row and rewrite the JSON, so a run killed by a time limit keeps its finished sizes."""
        rows.append(row)
        print(format_row(row), flush=True)
        if args.json_out:
            with open(args.json_out, "w", encoding="utf-8") as fh:
                json.dump({"meta": meta, "results": rows}, fh, indent=2)

    print(HEADER)

    wan_cfg = WAN_TINY if args.tiny else WAN_1_3B
    setup = trainable if args.train else (lambda model: model)
    frames = ([17] if args.tiny else [321]) if args.train else ([9, 17] if args.tiny else [81, 161, 321, 481])
    run_model("wan-1.3b", lambda: setup(build(WanTransformer3DModel, wan_cfg, device, dtype)), wan_cfg["patch_size"],
              lambda f: wan_inputs(wan_cfg, f, height, width, device, dtype), args.frames or frames, args, device,
              deadline, on_row)
    if args.hunyuan:
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the Wan model is gone with run_model's frame
        hv_cfg = HV15_TINY if args.tiny else HV15_480P
        run_model("hv-1.5", lambda: build(HunyuanVideo15Transformer3DModel, hv_cfg, device, dtype), (1, 1, 1),
                  lambda f: hv15_inputs(hv_cfg, f, height, width, device, dtype),
                  args.hunyuan_frames or ([9, 17] if args.tiny else [129, 193]), args, device, deadline, on_row)
    if args.json_out:
        print(f"wrote {args.json_out}")
    return 0


def _triton_version():
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


if __name__ == "__main__":
    sys.exit(main())
