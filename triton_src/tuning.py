"""Launch configurations for the block-sparse kernel, tuned per problem class and cached on disk.

A config is (BLOCK_M, BLOCK_N, num_warps, num_stages, use_tma). The tuning key is
(GPU name, Triton version, dtype, head dim, block-size class), where the block-size class is the
log2 bucket of the typical query-block size (a 1560-token frame and a 64-token cluster tile differently).
Winners are stored in ``triton_configs.json`` in the cache folder (`lvsa_kernels.settings`: entries
validated, writes merged under a file lock), so a second process does not retune. Under the Triton interpreter a fixed
small config is used and nothing is timed.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from ..settings import cache_dir, read_entries, update_entries
from .interpreter import interpreting

__all__ = ["KernelConfig", "candidate_configs", "cache_path", "lookup", "store", "stored_configs", "tuning_key",
           "interpreting"]

log = logging.getLogger("lvsa_kernels")


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    use_tma: bool = False
    warp_spec: bool = False
    kernel: str = "portable"  # "portable" (block_sparse_fwd.py) or "hopper" (block_sparse_hopper.py, sm_90 only)
    exp2_poly: int = 0  # hopper: 4 = one softmax exponential in 4 on the FMA units; 0: none
    tiles_per_step: int = 1  # hopper fp8: 2 = full key tiles folded two per softmax step; 1: one
    rowsum_mma: bool = False  # hopper fp8, 128-row tiles: the row sums of P on the tensor cores

    @property
    def fp8_only(self) -> bool:
        """Whether this is a Hopper variant that exists in fp8 only (two key tiles per step, 192-row tiles, row
        sums on the tensor cores)."""
        return self.kernel == "hopper" and (self.tiles_per_step != 1 or self.block_m != 128 or self.rowsum_mma)

    def __str__(self) -> str:
        if self.kernel == "hopper":
            poly = f" exp2_poly={self.exp2_poly}" if self.exp2_poly else ""
            pairs = f" tiles_per_step={self.tiles_per_step}" if self.tiles_per_step != 1 else ""
            rowsum = " rowsum_mma" if self.rowsum_mma else ""
            return (f"hopper BLOCK_M={self.block_m} BLOCK_N={self.block_n} stages={self.num_stages}{poly}{pairs}"
                    f"{rowsum}")
        return (f"BLOCK_M={self.block_m} BLOCK_N={self.block_n} warps={self.num_warps} "
                f"stages={self.num_stages} tma={self.use_tma} warp_spec={self.warp_spec}")


INTERPRETER_CONFIG = KernelConfig(block_m=16, block_n=16, num_warps=1, num_stages=1)


def hopper_configs(head_dim: int, precision: str = "exact", unmeasured: bool = False) -> List[KernelConfig]:
    """Configs of the warp-specialised Hopper kernel (128-row query tiles; shared memory holds Q and the ring,
    whose 8-bit K (and V^T) tiles take half the bytes, leaving room for a deeper ring). ``unmeasured``: also
    the fp8 variants no GPU run has timed yet, two key tiles per softmax step (``tiles_per_step=2``),
    192-row query tiles (``block_m=192``) and the row sums on the tensor cores (``rowsum_mma``): compiled by
    `compile_check`, run by the GPU tests and the sweep's ``--unmeasured``; the tuner leaves them out until a
    run has measured them."""
    # Fastest first, measured at Wan T=121 W=4 (exact: H200, bench/results/h200_hopper_sweep_run2.json; int8_qk:
    # H100, h100_s5_sweep_8bit_call2.json; fp8: H100, h100_s10_sweep_fp8_no_turns.json). fp8 also with one softmax
    # exponential in 4 on the FMA units (exp2_poly=4: 2% faster in the fifth session, 3% slower since the wgmma
    # key order, 6% slower without turns; slower for int8_qk).
    if precision == "exact":
        ring = [(128, 2, 0), (128, 3, 0), (64, 4, 0)]
    elif precision == "int8_qk":
        ring = [(128, 3, 0), (128, 4, 0), (128, 2, 0)]
    else:
        ring = [(128, 2, 0), (128, 4, 0), (128, 3, 0), (128, 2, 4)]
    configs = [KernelConfig(128, bn, 4, stages, True, True, "hopper", poly) for bn, stages, poly in ring]
    if unmeasured and precision == "fp8":
        # not yet timed on a GPU (eleventh session: no device lent), so the tuner does not offer them: the full
        # key tiles two per softmax step, and 192-row query tiles (three consumer warpgroups)
        configs += [KernelConfig(128, 128, 4, stages, True, True, "hopper", 0, 2) for stages in (4, 6)]
        configs += [KernelConfig(192, 128, 4, stages, True, True, "hopper") for stages in (2, 4)]
        # the row sums of P on the tensor cores, one and two key tiles per step
        configs += [KernelConfig(128, 128, 4, stages, True, True, "hopper", 0, tiles, True)
                    for stages, tiles in ((2, 1), (4, 2))]
    return configs


def candidate_configs(head_dim: int, tma_ok: bool, dtype: torch.dtype = torch.bfloat16,
                      hopper_ok: bool = False, precision: str = "exact") -> List[KernelConfig]:
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
        base = hopper_configs(head_dim, precision) + base
    return base


def tuning_key(device: torch.device, dtype: torch.dtype, head_dim: int, typical_q_block: int) -> str:
    import triton

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    size_class = int(math.log2(max(typical_q_block, 1)))
    return f"{gpu}|triton-{triton.__version__}|{str(dtype).replace('torch.', '')}|d{head_dim}|qb2^{size_class}"


def cache_path() -> Path:
    return cache_dir() / "triton_configs.json"


def _valid_config(key: str, raw: Any) -> Optional[KernelConfig]:
    """The `KernelConfig` a cache entry describes, or None when any field is missing or of the wrong kind."""
    if not isinstance(raw, dict) or set(raw) != {f.name for f in fields(KernelConfig)}:
        return None
    if type(raw["tiles_per_step"]) is not int or raw["tiles_per_step"] not in (1, 2) or (
            raw["tiles_per_step"] == 2 and (raw["kernel"] != "hopper" or raw["block_m"] != 128
                                            or raw["num_stages"] < 2)):
        return None
    if type(raw["rowsum_mma"]) is not bool or (raw["rowsum_mma"] and (raw["kernel"] != "hopper"
                                                                   or raw["block_m"] != 128)):
        return None
    if type(raw["exp2_poly"]) is not int or raw["exp2_poly"] not in (0, 4) or (
            raw["exp2_poly"] and raw["kernel"] != "hopper"):
        return None
    ints = [raw[n] for n in ("block_m", "block_n", "num_warps", "num_stages")]
    if not all(type(x) is int for x in ints) or not all(type(raw[n]) is bool for n in ("use_tma", "warp_spec")):
        return None
    if raw["kernel"] not in ("portable", "hopper"):
        return None
    bm, bn, warps, stages = ints
    if raw["kernel"] == "hopper" and bm == 192:  # three consumer warpgroups of 64 rows
        bm = 128
    pow2 = all(x > 0 and x & (x - 1) == 0 for x in (bm, bn, warps))
    if not pow2 or not (16 <= bm <= 256 and 16 <= bn <= 256 and warps <= 16 and 1 <= stages <= 8):
        return None
    return KernelConfig(**raw)


_memory: Dict[str, KernelConfig] = {}
_loaded_from: Optional[Path] = None


def _load() -> None:
    global _loaded_from
    path = cache_path()
    if _loaded_from == path:
        return
    _loaded_from = path
    for key, cfg in read_entries(path, _valid_config).items():
        _memory.setdefault(key, cfg)


def stored_configs() -> Dict[str, KernelConfig]:
    """The valid configs of the disk cache (invalid entries ignored with one WARNING)."""
    return read_entries(cache_path(), _valid_config)


def lookup(key: str) -> Optional[KernelConfig]:
    """The tuned config for ``key`` from memory or the disk cache, or None."""
    _load()
    return _memory.get(key)


def store(key: str, config: KernelConfig) -> None:
    """Record ``config`` for ``key`` in memory and in the disk cache (merged under its lock, atomic)."""
    _load()
    _memory[key] = config
    path = cache_path()
    try:
        update_entries(path, {key: asdict(config)}, _valid_config)
    except OSError as exc:  # a read-only home must not break attention; the config stays in memory
        log.warning("lvsa_kernels: could not write tuning cache %s: %s", path, exc)


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
