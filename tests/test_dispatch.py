"""Backend dispatch: every backend that runs here vs the reference, measured auto choice with its memory and
file cache, overrides, errors, and the ``backends`` command."""
import argparse
import json
import logging
import os
import subprocess
import sys
import time

import pytest
import torch

from lvsa_kernels import BackendUnavailable, BlockSparseLayout, LVSAPattern, block_sparse_attn, reference_attention
from lvsa_kernels import choice, dispatch
from lvsa_kernels.backends import base, registered_backends
from lvsa_kernels.backends.base import Backend, Capabilities
from lvsa_kernels.commands import backends as backends_command
from random_inputs import random_qkv

pytestmark = pytest.mark.usefixtures("isolated_dispatch_cache")


def _random_layout(seed, heads=1):
    g = torch.Generator().manual_seed(seed)
    nqb, nkb = 4, 5
    mask = torch.rand(heads, nqb, nkb, generator=g) < 0.4
    mask[:, torch.arange(nqb), torch.arange(nqb)] = True
    q_sizes = torch.randint(1, 9, (nqb,), generator=g).tolist()
    kv_sizes = torch.randint(1, 9, (nkb,), generator=g).tolist()
    return BlockSparseLayout.from_block_mask(mask if heads > 1 else mask[0], q_sizes, kv_sizes)


# ------------------------------------------------------------------------------------ real backends
@pytest.mark.parametrize("seed,heads,kv_heads", [(0, 1, 2), (1, 4, 2), (2, 4, 4)])
def test_every_runnable_backend_matches_reference(seed, heads, kv_heads):
    layout = _random_layout(seed, heads=heads)
    q, k, v = random_qkv(2, layout.q_len, layout.kv_len, 4, kv_heads, 16, seed=seed + 10)
    ref_out, ref_lse = reference_attention(q, k, v, layout, scale=0.3, return_lse=True)
    ran = []
    for name, backend in registered_backends().items():
        if backend.unsupported_reason(q, k, layout, True) is None:
            out, lse = block_sparse_attn(q, k, v, layout, backend=name, scale=0.3, return_lse=True)
            torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
            ran.append(name)
    assert "reference" in ran


def test_dense_layout_routes_to_sdpa_and_matches():
    q, k, v = random_qkv(1, 24, 24, 4, 2, 16, seed=3)
    layout = BlockSparseLayout.dense(24)
    assert dispatch.select_backend("auto", q, k, v, layout, 0.25, False).name == "sdpa"
    torch.testing.assert_close(block_sparse_attn(q, k, v, layout), reference_attention(q, k, v, layout),
                               rtol=1e-5, atol=1e-5)
    assert dispatch.select_backend("auto", q, k, v, layout, 0.25, True).name != "sdpa"   # sdpa has no lse


# ------------------------------------------------------------------------------------ auto with stand-in backends
class _Toy(Backend):
    """Exact (reference) attention on CPU; ``delay`` seconds slower per call."""

    def __init__(self, name, delay=0.0, reason=None):
        self.name, self.delay, self.reason, self.calls = name, delay, reason, 0
        self.caps = Capabilities(devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32}), head_dims=None)

    def unavailable_reason(self, device):
        return self.reason

    def run(self, q, k, v, layout, scale, return_lse):
        self.calls += 1
        time.sleep(self.delay)
        out, lse = reference_attention(q, k, v, layout, scale=scale, return_lse=True)
        return out, (lse if return_lse else None)


@pytest.fixture
def toys(monkeypatch):
    """Registry = reference, sdpa, 'slow', 'fast', 'broken' (unavailable); counts calls of `choice.measure`."""
    reg = {n: registered_backends()[n] for n in ("reference", "sdpa")}
    toys = {"slow": _Toy("slow", delay=0.02), "fast": _Toy("fast"), "broken": _Toy("broken", reason="needs a widget")}
    reg.update(toys)
    monkeypatch.setattr(base, "_REGISTRY", reg)
    timed = []
    real = choice.measure
    monkeypatch.setattr(choice, "measure", lambda fn, dev: timed.append(1) or real(fn, dev))
    toys["timed"] = timed
    return toys


def test_auto_measures_once_caches_and_reloads(toys, tmp_path, caplog):
    layout = _random_layout(4)
    q, k, v = random_qkv(1, layout.q_len, layout.kv_len, 2, 2, 8, seed=5)
    with caplog.at_level(logging.WARNING, logger="lvsa_kernels"):
        out = block_sparse_attn(q, k, v, layout)
        block_sparse_attn(q, k, v, layout)
    torch.testing.assert_close(out, reference_attention(q, k, v, layout), rtol=1e-5, atol=1e-5)
    assert len(toys["timed"]) == 2                             # slow and fast, once each
    assert caplog.text.count("skipping backend 'broken': needs a widget") == 1
    data = json.loads((tmp_path / "backends.json").read_text())
    (key, entry), = data["entries"].items()
    assert entry["winner"] == "fast" and set(entry["times_ms"]) == {"slow", "fast"}
    assert key == dispatch.problem_key(q, k, layout, False) + "|candidates=slow,fast"
    assert "|float32|d8|gqa1|" in key and "|shared|lse0" in key
    assert not [p for p in tmp_path.iterdir() if p.name != "backends.json"]   # no temporary files left

    dispatch.reset_state()                                      # as a fresh process would start
    fast_calls = toys["fast"].calls
    assert dispatch.select_backend("auto", q, k, v, layout, 0.3, False).name == "fast"
    assert len(toys["timed"]) == 2 and toys["fast"].calls == fast_calls


def test_a_second_process_reads_the_cache(toys, tmp_path):
    layout = _random_layout(6)
    q, k, v = random_qkv(1, layout.q_len, layout.kv_len, 2, 2, 8, seed=7)
    block_sparse_attn(q, k, v, layout)
    key = dispatch.problem_key(q, k, layout, False) + "|candidates=slow,fast"
    data = json.loads((tmp_path / "backends.json").read_text())
    data["entries"][key]["winner"] = "slow"                     # another process decided otherwise
    (tmp_path / "backends.json").write_text(json.dumps(data))
    dispatch.reset_state()
    assert dispatch.select_backend("auto", q, k, v, layout, 0.3, False).name == "slow"
    assert len(toys["timed"]) == 2


def test_corrupt_cache_file_is_measured_again(toys, tmp_path, caplog):
    (tmp_path / "backends.json").write_text("{not json")
    layout = _random_layout(8)
    q, k, v = random_qkv(1, layout.q_len, layout.kv_len, 2, 2, 8, seed=9)
    with caplog.at_level(logging.WARNING, logger="lvsa_kernels"):
        assert dispatch.select_backend("auto", q, k, v, layout, 0.3, False).name == "fast"
    assert "cannot read" in caplog.text and len(toys["timed"]) == 2
    assert json.loads((tmp_path / "backends.json").read_text())["version"] == 1


def test_no_timing_while_compiling(toys, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    layout = _random_layout(10)
    q, k, v = random_qkv(1, layout.q_len, layout.kv_len, 2, 2, 8, seed=11)
    assert dispatch.select_backend("auto", q, k, v, layout, 0.3, False).name == "slow"   # first in order
    assert toys["timed"] == [] and not (tmp_path / "backends.json").exists()


def test_overrides_argument_and_environment(toys, monkeypatch):
    layout = _random_layout(12)
    q, k, v = random_qkv(1, layout.q_len, layout.kv_len, 2, 2, 8, seed=13)
    assert dispatch.select_backend("slow", q, k, v, layout, 0.3, False).name == "slow"
    monkeypatch.setenv(dispatch.ENV_BACKEND, "reference")
    assert dispatch.select_backend("auto", q, k, v, layout, 0.3, False).name == "reference"
    assert dispatch.select_backend("fast", q, k, v, layout, 0.3, False).name == "fast"   # argument wins
    assert toys["timed"] == []
    monkeypatch.setenv(dispatch.ENV_BACKEND, "nope")
    with pytest.raises(ValueError, match="LVSA_KERNELS_BACKEND.*unknown backend 'nope'"):
        dispatch.select_backend("auto", q, k, v, layout, 0.3, False)


def test_explicit_unavailable_backend_names_what_is_missing(toys):
    layout = _random_layout(14)
    q, k, v = random_qkv(1, layout.q_len, layout.kv_len, 2, 2, 8, seed=15)
    with pytest.raises(BackendUnavailable, match="'broken'.*needs a widget"):
        block_sparse_attn(q, k, v, layout, backend="broken")
    with pytest.raises(BackendUnavailable, match="'sdpa'.*dense layouts only"):
        block_sparse_attn(q, k, v, layout, backend="sdpa")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        block_sparse_attn(q, k, v, layout, backend="nope")


def test_reference_only_when_nothing_else_runs(toys, monkeypatch, caplog):
    layout = _random_layout(16)
    q, k, v = random_qkv(1, layout.q_len, layout.kv_len, 2, 2, 8, seed=17)
    q64, k64, v64 = (x.double() for x in (q, k, v))              # the toys take float32 only
    with caplog.at_level(logging.WARNING, logger="lvsa_kernels"):
        assert dispatch.select_backend("auto", q64, k64, v64, layout, 0.3, False).name == "reference"
    assert "skipping backend 'fast'" in caplog.text and "'reference' backend" in caplog.text
    assert toys["timed"] == []


def test_unavailable_real_backends_raise_here():
    q, k, v = random_qkv(1, 8, 8, 2, 2, 8, seed=18, dtype=torch.float16)
    layout = BlockSparseLayout.dense(8)
    for name, backend in registered_backends().items():
        reason = backend.unsupported_reason(q, k, layout, False)
        if reason:
            with pytest.raises(BackendUnavailable, match=name):
                block_sparse_attn(q, k, v, layout, backend=name)


# ------------------------------------------------------------------------------------ permuted plans
def _permuted_plan(B=2, S=24, H=2, seed=4):
    from lvsa_kernels.reference.svoo import SVOOPlanner

    q, k, v = random_qkv(B, S, S, H, H, 8, seed=seed)
    plan = SVOOPlanner(top_p=0.6, q_clusters=3, k_clusters=5, warmup_steps=0).plan(q, k, 0, 0)
    assert plan.permuted and 0 < min(l.density for l in plan.layouts) < 1
    return q, k, v, plan


def test_permuted_plan_output_and_lse_come_back_in_token_order():
    from lvsa_kernels.reference.plan import permute_tokens, unpermute_tokens

    q, k, v, plan = _permuted_plan()
    out, lse = block_sparse_attn(q, k, v, plan, backend="reference", scale=0.3, return_lse=True)
    qp, kp, vp = permute_tokens(q, plan.q_perm), permute_tokens(k, plan.k_perm), permute_tokens(v, plan.k_perm)
    for b, layout in enumerate(plan.layouts):
        ref_out, ref_lse = reference_attention(qp[b:b + 1], kp[b:b + 1], vp[b:b + 1], layout, scale=0.3,
                                               return_lse=True)
        torch.testing.assert_close(out[b:b + 1], unpermute_tokens(ref_out, plan.q_perm[b:b + 1]))
        torch.testing.assert_close(lse[b, :, plan.q_perm[b]].diagonal().T, ref_lse[0])   # lse[b, h, perm[b, h, s]]


def test_auto_chooses_for_permuted_plans_by_the_same_measurement(toys, tmp_path):
    q, k, v, plan = _permuted_plan()
    out = block_sparse_attn(q, k, v, plan)
    torch.testing.assert_close(out, block_sparse_attn(q, k, v, plan, backend="reference"))
    assert len(toys["timed"]) == 2                             # slow and fast, once each
    (key, entry), = json.loads((tmp_path / "backends.json").read_text())["entries"].items()
    assert key == dispatch.problem_key(q, k, plan, False) + "|candidates=slow,fast" and "|permuted|per-head|" in key
    assert entry["winner"] == "fast"
    block_sparse_attn(q, k, v, plan)
    assert len(toys["timed"]) == 2


def test_permuted_plan_input_errors():
    q, k, v, plan = _permuted_plan()
    with pytest.raises(ValueError, match="equal shapes"):
        block_sparse_attn(q, k[:, :12], v[:, :12], plan)
    with pytest.raises(ValueError, match="plan.q_perm"):
        block_sparse_attn(q[:1], k[:1], v[:1], plan)


# ------------------------------------------------------------------------------------ the backends command
def _expected_reason(backend, device_type):
    return backends_command.backend_status(backend)["devices"][device_type]


def test_backends_command_is_truthful(toys, tmp_path, capsys):
    layout = LVSAPattern(window=1, n_first=1, reference_frames=3).plan(6, 4)
    q, k, v = random_qkv(1, layout.q_len, layout.kv_len, 2, 2, 8, seed=19)
    block_sparse_attn(q, k, v, layout)
    parser = argparse.ArgumentParser()
    backends_command.add_arguments(parser)
    assert backends_command.run(parser.parse_args(["--json"])) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cache_file"] == str(tmp_path / "backends.json")
    assert [e["winner"] for e in report["cached_choices"].values()] == ["fast"]
    assert report["backends"]["broken"]["devices"] == {"cpu": "needs a widget"}
    assert report["backends"]["fast"]["devices"] == {"cpu": None}
    assert report["backends"]["reference"]["devices"]["cpu"] is None
    if not torch.cuda.is_available():
        assert report["backends"]["reference"]["devices"]["cuda"] == "no CUDA device"


def test_python_m_backends_runs(tmp_path):
    env = dict(os.environ, **{dispatch.ENV_CACHE_DIR: str(tmp_path)})
    res = subprocess.run([sys.executable, "-m", "lvsa_kernels", "backends"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    for name, backend in registered_backends().items():
        assert f"\n{name} " in "\n" + res.stdout
        for device_type, reason in backends_command.backend_status(backend)["devices"].items():
            if reason:
                assert f"{device_type}: {reason}" in res.stdout
    assert str(tmp_path / "backends.json") in res.stdout and "none yet" in res.stdout


def test_auto_does_not_time_a_candidate_that_would_build(toys, monkeypatch, caplog):
    """A backend whose first run would JIT-compile (FlashInfer) is not timed while a ready one exists."""
    monkeypatch.setattr(toys["fast"], "build_needed", lambda q, layout: "a module for d8", raising=False)
    layout = _random_layout(11)
    q, k, v = random_qkv(1, layout.q_len, layout.kv_len, 2, 2, 8, seed=11)
    with caplog.at_level(logging.WARNING, logger="lvsa_kernels"):
        chosen = dispatch.select_backend("auto", q, k, v, layout, 0.3, False)
        dispatch.select_backend("auto", q, k, v, layout, 0.3, False)
    assert chosen.name == "slow" and toys["fast"].calls == 0 and len(toys["timed"]) == 0   # one ready: untimed
    assert caplog.text.count("not timing backend 'fast': its first run would JIT-build a module for d8") == 1
