"""Launch configurations for the block-sparse kernel, tuned per problem class and cached on disk.

A config is (BLOCK_M, BLOCK_N, num_warps, num_stages, use_tma). The tuning key is
(GPU name, Triton version, dtype, head dim, block-size class), where the block-size class is the
log2 bucket of the typical query-block size (a 1560-token frame and a 64-token cluster tile differently).
Winners are stored in ``$LVSA_KERNELS_CACHE_DIR/triton_configs.json`` (default
``~/.cache/lvsa_kernels``), so a second process does not retune. Under the Triton interpreter a fixed
small config is used and nothing is timed.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

__all__ = ["KernelConfig", "candidate_configs", "cache_path", "lookup", "store", "tuning_key", "interpreting"]

CACHE_ENV = "LVSA_KERNELS_CACHE_DIR"


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    use_tma: bool = False
    warp_spec: bool = False
    kernel: str = "portable"  # "portable" (block_sparse_fwd.py) or "hopper" (block_sparse_hopper.py, sm_90 only)

    def __str__(self) -> str:
        if self.kernel == "hopper":
            return f"hopper BLOCK_M={self.block_m} BLOCK_N={self.block_n} stages={self.num_stages}"
        return (f"BLOCK_M={self.block_m} BLOCK_N={self.block_n} warps={self.num_warps} "
                f"stages={self.num_stages} tma={self.use_tma} warp_spec={self.warp_spec}")


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


INTERPRETER_CONFIG = KernelConfig(block_m=16, block_n=16, num_warps=1, num_stages=1)


def hopper_configs(head_dim: int) -> List[KernelConfig]:
    """Configs of the warp-specialised Hopper kernel (128-row query tiles; shared memory holds Q and the ring)."""
    # measured on an H200 (bench/results/h200_hopper_sweep_run2.json): 128-column key tiles, 2 stages first
    ring = [(128, 2), (128, 3), (64, 4)]
    return [KernelConfig(128, bn, 4, stages, True, True, "hopper") for bn, stages in ring]


def candidate_configs(head_dim: int, tma_ok: bool, dtype: torch.dtype = torch.bfloat16,
                      hopper_ok: bool = False) -> List[KernelConfig]:
    """Configs worth timing on a GPU for ``head_dim`` (first = the default when nothing is tuned)."""
    if dtype == torch.float32:  # 4-byte tiles: keep shared memory under the 227 KB limit
        return [KernelConfig(64, 32, 4, 2), KernelConfig(64, 64, 4, 2), KernelConfig(32, 32, 4, 2)]
    base = [
        KernelConfig(128, 128, 8, 3), KernelConfig(128, 64, 8, 3), KernelConfig(128, 64, 8, 4),
        KernelConfig(64, 64, 4, 3),
    ]
    if head_dim <= 64:
        base += [KernelConfig(128, 128, 4, 3), KernelConfig(64, 128, 4, 3)]
    if tma_ok:  # measured fastest on H100 (bench/results/h100_kernel_sweep_run2.json): TMA, 128 x 128, 8 warps
        base = [KernelConfig(128, 128, 8, 3, True), KernelConfig(128, 128, 8, 3, True, True),
                KernelConfig(128, 64, 8, 3, True), KernelConfig(128, 128, 8, 2, True),
                KernelConfig(128, 64, 8, 4, True)] + base
    if hopper_ok:
        base = hopper_configs(head_dim) + base
    return base


def tuning_key(device: torch.device, dtype: torch.dtype, head_dim: int, typical_q_block: int) -> str:
    import triton

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    size_class = int(math.log2(max(typical_q_block, 1)))
    return f"{gpu}|triton-{triton.__version__}|{str(dtype).replace('torch.', '')}|d{head_dim}|qb2^{size_class}"


def cache_path() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "lvsa_kernels")
    return Path(root) / "triton_configs.json"


_memory: Dict[str, KernelConfig] = {}
_loaded_from: Optional[Path] = None


def _load() -> None:
    global _loaded_from
    path = cache_path()
    if _loaded_from == path:
        return
    _loaded_from = path
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    for key, cfg in data.items():
        try:
            _memory.setdefault(key, KernelConfig(**cfg))
        except TypeError:
            continue  # an entry from an incompatible version: ignore it, it will be retuned


def lookup(key: str) -> Optional[KernelConfig]:
    """The tuned config for ``key`` from memory or the disk cache, or None."""
    _load()
    return _memory.get(key)


def store(key: str, config: KernelConfig) -> None:
    """Record ``config`` for ``key`` in memory and atomically in the disk cache."""
    _load()
    _memory[key] = config
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        data[key] = asdict(config)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".triton_configs.", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home must not break attention; the config stays in memory
        import logging

        logging.getLogger("lvsa_kernels").warning("could not write tuning cache %s: %s", path, exc)


def tune(key: str, configs: List[KernelConfig], bench: Callable[[KernelConfig], float]) -> KernelConfig:
    """Time every config with ``bench`` (returns milliseconds; raises if the config cannot run) and store the best."""
    best, best_ms, errors = None, float("inf"), []
    for cfg in configs:
        try:
            ms = bench(cfg)
        except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory for this tile shape
            errors.append(f"{cfg}: {type(exc).__name__}: {exc}"[:300])
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise RuntimeError("no kernel config could run:\n" + "\n".join(errors))
    store(key, best)
    return best
