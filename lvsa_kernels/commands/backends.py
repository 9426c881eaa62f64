"""List every registered attention backend, whether it can run on this machine (and why not), and the
backend choices that ``backend="auto"`` has measured and cached (see `lvsa_kernels.dispatch`)."""
from __future__ import annotations

import argparse
import json
import os
from typing import TYPE_CHECKING, Any, Dict, List, Optional

if TYPE_CHECKING:
    import torch

    from ..backends import Backend

HELP = "show which backends can run here, why others cannot, and the cached auto choices"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _device(device_type: str) -> Optional[torch.device]:
    import torch

    try:
        return torch.device(device_type)
    except RuntimeError:
        return None


def _missing_device(device_type: str) -> Optional[str]:
    """Why no ``device_type`` device is usable here, or None."""
    import torch

    from ..npu.detect import load_torch_npu

    if device_type == "cpu":
        return None
    if _device(device_type) is None:
        detail = f": {load_torch_npu()[1]}" if device_type == "npu" else ""
        return f"torch has no '{device_type}' device type{detail}"
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device"
    module = getattr(torch, device_type, None)
    return None if module is not None and module.is_available() else f"no {device_type} device"


def backend_status(backend: Backend) -> Dict[str, Any]:
    """Capabilities and, per device type it supports, ``None`` (can run) or the reason it cannot."""
    c = backend.caps
    devices = {}
    for device_type in sorted(c.devices):
        dev = _device(device_type)
        reason = backend.unavailable_reason(dev) if dev is not None else None
        devices[device_type] = reason or _missing_device(device_type)
    return {
        "devices": devices,
        "dtypes": sorted(str(d).replace("torch.", "") for d in c.dtypes),
        "head_dims": "any" if c.head_dims is None else sorted(c.head_dims),
        "gqa": c.gqa, "per_head_layouts": c.per_head_layouts, "lse": c.lse, "dense_only": c.dense_only,
        "notes": getattr(backend, "notes", ""),
    }


def _text(status: Dict[str, Dict[str, Any]], choices: Dict[str, Dict[str, Any]]) -> List[str]:
    import torch

    from ..dispatch import ENV_BACKEND, ENV_CACHE_DIR, cache_file

    lines = [f"torch {torch.__version__}; override with backend=... or {ENV_BACKEND}"
             f"{' (now ' + repr(os.environ[ENV_BACKEND]) + ')' if os.environ.get(ENV_BACKEND) else ''}", ""]
    for name, s in status.items():
        usable = [d for d, r in s["devices"].items() if r is None]
        lines.append(f"{name:11s} {'available on ' + ', '.join(usable) if usable else 'unavailable here'}")
        for device_type, reason in s["devices"].items():
            if reason:
                lines.append(f"{'':11s}   {device_type}: {reason}")
        flags = [f for f in ("gqa", "per_head_layouts", "lse", "dense_only") if s[f]]
        lines.append(f"{'':11s}   dtypes {', '.join(s['dtypes'])}; head dims {s['head_dims']}; {', '.join(flags)}")
        if s["notes"]:
            lines.append(f"{'':11s}   {s['notes']}")
    lines += ["", f"cached auto choices ({cache_file()}; folder from {ENV_CACHE_DIR} or ~/.cache/lvsa_kernels):"]
    if not choices:
        lines.append("  none yet")
    for key, entry in sorted(choices.items()):
        times = ", ".join(f"{n} {t:.3f} ms" for n, t in entry.get("times_ms", {}).items())
        lines.append(f"  {key}\n      -> {entry.get('winner')} ({times})")
    return lines


def run(args: argparse.Namespace) -> int:
    from ..backends import registered_backends
    from ..dispatch import cache_file, cached_choices

    status = {name: backend_status(b) for name, b in registered_backends().items()}
    choices = cached_choices()
    if args.json:
        print(json.dumps({"backends": status, "cache_file": str(cache_file()), "cached_choices": choices}, indent=1))
    else:
        print("\n".join(_text(status, choices)))
    return 0
