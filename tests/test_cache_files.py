"""Cache files (dispatch choices, tuned launch configs): any JSON shape is validated, writes are merged
under a lock so concurrent processes keep each other's entries."""
import json
import logging
import subprocess
import sys

import pytest

from lvsa_kernels import choice, dispatch, settings
from lvsa_kernels.triton_src import tuning
from lvsa_kernels.triton_src.tuning import KernelConfig

GOOD = {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 2, "use_tma": False, "warp_spec": False,
        "kernel": "portable", "exp2_poly": 0, "tiles_per_step": 1, "rowsum_mma": False}
BAD_CONFIGS = {
    "list": [64, 32], "string": "64", "missing": {"block_m": 64}, "text field": {**GOOD, "block_m": "64"},
    "bool field": {**GOOD, "num_warps": True}, "float field": {**GOOD, "block_n": 32.0},
    "not a power of 2": {**GOOD, "block_m": 48}, "flag as int": {**GOOD, "use_tma": 1},
    "extra field": {**GOOD, "x": 1}, "zero stages": {**GOOD, "num_stages": 0},
    "unknown kernel": {**GOOD, "kernel": "cuda"}, "no kernel field (older cache)": {k: v for k, v in GOOD.items() if k != "kernel"},
    "no exp2_poly field (older cache)": {k: v for k, v in GOOD.items() if k != "exp2_poly"},
    "exp2_poly on the portable kernel": {**GOOD, "exp2_poly": 4}, "exp2_poly 2": {**GOOD, "kernel": "hopper", "exp2_poly": 2},
    "no tiles_per_step field (older cache)": {k: v for k, v in GOOD.items() if k != "tiles_per_step"},
    "tiles_per_step on the portable kernel": {**GOOD, "tiles_per_step": 2},
    "tiles_per_step 3": {**GOOD, "kernel": "hopper", "tiles_per_step": 3},
    "tiles_per_step as bool": {**GOOD, "kernel": "hopper", "tiles_per_step": True},
    "pairs in a 1-stage ring": {**GOOD, "kernel": "hopper", "block_m": 128, "num_stages": 1, "tiles_per_step": 2},
    "pairs with 192-row tiles": {**GOOD, "kernel": "hopper", "block_m": 192, "tiles_per_step": 2},
    "no rowsum_mma field (older cache)": {k: v for k, v in GOOD.items() if k != "rowsum_mma"},
    "rowsum_mma on the portable kernel": {**GOOD, "rowsum_mma": True},
    "rowsum_mma with 192-row tiles": {**GOOD, "kernel": "hopper", "block_m": 192, "rowsum_mma": True},
    "rowsum_mma as int": {**GOOD, "kernel": "hopper", "block_m": 128, "rowsum_mma": 1},
}


@pytest.fixture
def cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(settings.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.setattr(tuning, "_memory", {})
    monkeypatch.setattr(tuning, "_loaded_from", None)
    dispatch.reset_state()
    yield tmp_path
    dispatch.reset_state()


def test_tuning_cache_ignores_bad_entries_with_one_warning(cache_dir, caplog):
    entries = {**BAD_CONFIGS, "good": GOOD}
    (cache_dir / "triton_configs.json").write_text(json.dumps({"version": 1, "entries": entries}))
    with caplog.at_level(logging.WARNING, logger="lvsa_kernels"):
        assert tuning.lookup("good") == KernelConfig(64, 32, 4, 2)
        assert all(tuning.lookup(k) is None for k in BAD_CONFIGS)
    assert len(caplog.records) == 1 and f"{len(BAD_CONFIGS)} invalid entries" in caplog.text


@pytest.mark.parametrize("cfg", [KernelConfig(128, 128, 4, 2, True, True, "hopper", 4),
                                 KernelConfig(128, 128, 4, 4, True, True, "hopper", 0, 2, True)], ids=str)
def test_tuning_cache_keeps_hopper_configs(cache_dir, cfg):
    """The exp2 split and the fp8 pair walk with the row sums on the tensor cores survive the disk cache."""
    tuning.store("hopper", cfg)
    tuning._memory.clear()
    tuning._loaded_from = None
    assert tuning.lookup("hopper") == cfg


@pytest.mark.parametrize("content", ["[1, 2]", '{"version": 1, "entries": []}', "\xff\xfe not utf-8", "null"])
def test_tuning_cache_of_any_shape_is_ignored(cache_dir, caplog, content):
    (cache_dir / "triton_configs.json").write_bytes(content.encode("latin-1"))
    with caplog.at_level(logging.WARNING, logger="lvsa_kernels"):
        assert tuning.lookup("x") is None
    assert len(caplog.records) == 1
    tuning.store("x", KernelConfig(64, 32, 4, 2))  # the bad file is replaced by a valid one
    assert json.loads((cache_dir / "triton_configs.json").read_text())["entries"]["x"] == GOOD


def test_dispatch_cache_ignores_bad_entries_with_one_warning(cache_dir, caplog):
    entries = {"list": ["fast"], "winner list": {"winner": ["fast"]}, "winner int": {"winner": 3},
               "times text": {"winner": "fast", "times_ms": {"fast": "1 ms"}},
               "times list": {"winner": "fast", "times_ms": [1.0]}, "good": {"winner": "fast", "times_ms": {"fast": 1.5}}}
    dispatch.cache_file().write_text(json.dumps({"version": 1, "entries": entries}))
    with caplog.at_level(logging.WARNING, logger="lvsa_kernels"):
        assert dispatch.cached_choices() == {"good": {"winner": "fast", "times_ms": {"fast": 1.5}}}
        dispatch.timed_choice("winner list", {"fast": lambda: None, "slow": lambda: None}, __import__("torch").device("cpu"))
    assert caplog.text.count("invalid entries") == 1


_WRITER = """
import importlib.util, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("settings", sys.argv[2])   # a leaf module: no torch import
settings = importlib.util.module_from_spec(spec)
spec.loader.exec_module(settings)
for i in range(40):
    settings.update_entries(Path(sys.argv[3]), {f"{sys.argv[1]}-{i}": i}, lambda key, value: value)
"""


def test_processes_writing_at_once_keep_every_entry(cache_dir):
    """Both caches write through `settings.update_entries`: read-merge-replace under the folder lock."""
    target = cache_dir / "backends.json"
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, name, settings.__file__, str(target)])
             for name in "abcd"]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    entries = json.loads(target.read_text())["entries"]
    assert entries == {f"{n}-{i}": i for n in "abcd" for i in range(40)}
    assert [p.name for p in cache_dir.iterdir()] == ["backends.json"]     # no lock or temporary files left


def test_both_caches_write_through_settings(cache_dir):
    tuning.store("k", KernelConfig(64, 32, 4, 2))
    choice._cache().put("k", "fast", {"fast": 1.0})
    assert json.loads((cache_dir / "triton_configs.json").read_text()) == {"version": 1, "entries": {"k": GOOD}}
    assert json.loads(dispatch.cache_file().read_text())["entries"]["k"]["winner"] == "fast"
