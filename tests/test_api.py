"""block_sparse_attn: input validation, backend selection (explicit, env override), and the plan/demo CLI."""
import pytest
import torch

from lvsa_kernels import BackendUnavailable, BlockSparseLayout, LVSAPattern, block_sparse_attn, reference_attention
from lvsa_kernels.__main__ import main
from lvsa_kernels.backends import base
from lvsa_kernels.backends.base import Backend, Capabilities
from lvsa_kernels.dispatch import ENV_BACKEND, ENV_CACHE_DIR


@pytest.fixture(autouse=True)
def isolated_choice_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.delenv(ENV_BACKEND, raising=False)


def qkv(B=1, S=12, H=2, Hkv=2, D=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, S, H, D, generator=g, dtype=dtype),
            torch.randn(B, S, Hkv, D, generator=g, dtype=dtype),
            torch.randn(B, S, Hkv, D, generator=g, dtype=dtype))


def sparse_layout(S=12):
    return LVSAPattern(window=1, reference_frames=2).plan(S // 2, 2)


class Recorder(Backend):
    """Runs the reference and counts calls; ``factor`` != 1 makes it wrong on purpose."""

    caps = Capabilities(devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32}), head_dims=None)

    def __init__(self, name, factor=1.0):
        self.name, self.factor, self.calls = name, factor, 0

    def run(self, q, k, v, layout, scale, return_lse):
        self.calls += 1
        out, lse = reference_attention(q, k, v, layout, scale=scale, return_lse=True)
        return out * self.factor, (lse if return_lse else None)


def register_temporarily(monkeypatch, backend):
    monkeypatch.setitem(base._REGISTRY, backend.name, backend)
    return backend


# ---------------------------------------------------------------- bad inputs
def test_wrong_dims():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q: expected 4 dims \[B, S, H, D\]"):
        block_sparse_attn(q[0], k, v, BlockSparseLayout.dense(12))
    with pytest.raises(ValueError, match="v: expected 4 dims"):
        block_sparse_attn(q, k, v[..., None], BlockSparseLayout.dense(12))


def test_non_tensor_inputs():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="k: expected a torch.Tensor"):
        block_sparse_attn(q, k.tolist(), v, BlockSparseLayout.dense(12))
    with pytest.raises(TypeError, match="layout: expected a BlockSparseLayout"):
        block_sparse_attn(q, k, v, torch.ones(6, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match="backend: expected a str"):
        block_sparse_attn(q, k, v, BlockSparseLayout.dense(12), backend=None)


def test_dtype_errors():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="dtypes must match"):
        block_sparse_attn(q, k.double(), v, BlockSparseLayout.dense(12))
    with pytest.raises(TypeError, match="q: expected dtype"):
        block_sparse_attn(q.int(), k.int(), v.int(), BlockSparseLayout.dense(12))


def test_device_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="must be on one device"):
        block_sparse_attn(q, k.to("meta"), v, BlockSparseLayout.dense(12))


def test_shape_mismatches():
    q, k, v = qkv()
    layout = BlockSparseLayout.dense(12)
    with pytest.raises(ValueError, match="k, v: shapes must match"):
        block_sparse_attn(q, k, v[:, :, :1], layout)
    with pytest.raises(ValueError, match="k: batch 2 does not match q's batch 1"):
        block_sparse_attn(q, k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), layout)
    with pytest.raises(ValueError, match="k: head dim 4 does not match q's head dim 8"):
        block_sparse_attn(q, k[..., :4], v[..., :4], layout)


def test_gqa_divisibility():
    q, k, v = qkv(H=4, Hkv=3)
    with pytest.raises(ValueError, match="H_kv=3 must divide the number of query heads H=4"):
        block_sparse_attn(q, k, v, BlockSparseLayout.dense(12))


def test_layout_sequence_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="layout: covers 10 query tokens but q has S=12"):
        block_sparse_attn(q, k, v, BlockSparseLayout.dense(10, 12))
    with pytest.raises(ValueError, match="layout: covers 10 key tokens but k has S=12"):
        block_sparse_attn(q, k, v, BlockSparseLayout.dense(12, 10))


def test_layout_sequence_mismatch_names_the_axis_order():
    """q, k, v given as [B, H, S, D] (the SDPA order) get the expected order and the transpose in the error."""
    q, k, v = (t.transpose(1, 2) for t in qkv())  # [1, 2, 12, 16]: heads on dim 1
    with pytest.raises(ValueError, match=r"q has S=2 \(expected \[B, S, H, D\]; shape \(1, 2, 12, 8\) looks like "
                                         r"\[B, H, S, D\]: pass \.transpose\(1, 2\)\)"):
        block_sparse_attn(q, k, v, BlockSparseLayout.dense(12))
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q has S=12 \(expected \[B, S, H, D\], sequence on dim 1"):
        block_sparse_attn(q, k, v, BlockSparseLayout.dense(10, 12))


def test_layout_heads_mismatch():
    q, k, v = qkv(H=4, Hkv=2)
    layout = BlockSparseLayout.from_block_mask(torch.ones(3, 2, 2, dtype=torch.bool), [6, 6], [6, 6])
    with pytest.raises(ValueError, match=r"layout: has 3 heads; expected 1 \(shared\) or H=4"):
        block_sparse_attn(q, k, v, layout)


def test_unknown_backend():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="backend: unknown backend 'cudnn'"):
        block_sparse_attn(q, k, v, BlockSparseLayout.dense(12), backend="cudnn")


# ---------------------------------------------------------------- backends
@pytest.mark.parametrize("H,Hkv", [(2, 2), (4, 2)])
def test_reference_and_sdpa_agree_on_dense(H, Hkv):
    q, k, v = qkv(B=2, S=20, H=H, Hkv=Hkv, D=16, seed=3)
    layout = BlockSparseLayout.from_block_mask(torch.ones(2, 3, dtype=torch.bool), [8, 12], [5, 5, 10])
    assert layout.is_dense
    ref = block_sparse_attn(q, k, v, layout, backend="reference", scale=0.3)
    sdpa = block_sparse_attn(q, k, v, layout, backend="sdpa", scale=0.3)
    torch.testing.assert_close(sdpa, ref, rtol=1e-5, atol=1e-5)


def test_reference_backend_matches_reference_attention_with_lse():
    q, k, v = qkv(seed=4)
    layout = sparse_layout()
    out, lse = block_sparse_attn(q, k, v, layout, backend="reference", return_lse=True)
    exp_out, exp_lse = reference_attention(q, k, v, layout, return_lse=True)
    assert torch.equal(out, exp_out) and torch.equal(lse, exp_lse)


def test_sdpa_refuses_sparse_layout_and_lse():
    q, k, v = qkv()
    with pytest.raises(BackendUnavailable, match="sdpa"):
        block_sparse_attn(q, k, v, sparse_layout(), backend="sdpa")
    with pytest.raises(BackendUnavailable, match="lse"):
        block_sparse_attn(q, k, v, BlockSparseLayout.dense(12), backend="sdpa", return_lse=True)


def test_env_var_overrides_auto(monkeypatch):
    rec = register_temporarily(monkeypatch, Recorder("recorder"))
    q, k, v = qkv(seed=5)
    layout = sparse_layout()
    monkeypatch.setenv(ENV_BACKEND, "recorder")
    out = block_sparse_attn(q, k, v, layout)
    assert rec.calls == 1
    torch.testing.assert_close(out, reference_attention(q, k, v, layout), rtol=1e-6, atol=1e-6)
    block_sparse_attn(q, k, v, layout, backend="reference")  # an explicit backend beats the env var
    assert rec.calls == 1
    monkeypatch.setenv(ENV_BACKEND, "sdpa")
    with pytest.raises(BackendUnavailable, match="sdpa"):
        block_sparse_attn(q, k, v, layout)


# ---------------------------------------------------------------- CLI
def test_plan_command(capsys):
    assert main(["plan", "--model", "wan", "--video-frames", "481", "--step", "3"]) == 0
    out = capsys.readouterr().out
    assert "kfi=9" in out and "offset=3" in out and "|G|=15" in out and "|A|=22" in out and "ideal speedup=5.50x" in out
    assert "block map" in out and "   120 " in out


def test_plan_command_with_text_and_knobs(capsys):
    assert main(["plan", "--model", "cogvideox", "--frames", "26", "--window", "2", "--kfi", "4"]) == 0
    out = capsys.readouterr().out
    assert "226 text tokens before the video" in out and "kfi=4" in out and "W=2" in out
    assert "T" in out.split("block map")[1]
    # frames and blocks are told apart: the text block comes first, so global frame f is key block f + 1
    assert "global_frames: (0, 4, 8, 12, 16, 20, 24)" in out and "global_kv_blocks: (1, 5, 9, 13, 17, 21, 25)" in out
    rows = out.split("block map")[1].splitlines()
    assert rows[2].split()[1][:6] == "TGWWWG"  # query frame 0: text, global frame 0, window, global frame 4


def test_plan_command_without_text(capsys):
    assert main(["plan", "--model", "wan", "--frames", "30"]) == 0
    out = capsys.readouterr().out
    assert "video tokens only (no text in self-attention)" in out and "text none" not in out


DEMO_SMALL = ["demo", "--frames", "30", "--run-frames", "30", "--tokens-per-frame", "4", "--heads", "1",
              "--head-dim", "16", "--repeats", "1", "--device", "cpu"]


def _rows(out: str, header: str) -> dict:
    """{first word: last word} of the table rows under the line starting with ``header``."""
    lines = out.split("\n" + header, 1)[1].splitlines()[1:]
    rows = {}
    for line in lines:
        if not line.strip() or line.startswith(("skipped", "(", "FAILED", "\n")):
            break
        if "skipped:" not in line:  # a backend that cannot run here says why on its row
            rows[line.split()[0]] = line.split()[-1]
    return rows


def test_demo_runs_every_backend(monkeypatch, capsys):
    rec = register_temporarily(monkeypatch, Recorder("recorder"))
    assert main(DEMO_SMALL) == 0
    out = capsys.readouterr().out
    summary = out.split("correctness check")[0]  # the summary comes first, without the frame map
    assert "keyframe interval (kfi) 2" in summary and "ideal speedup" in summary and "block map" not in summary
    assert rec.calls == 1  # CPU: one checked call, no timing loop
    assert "vs dense" not in out and "dense SDPA" not in out  # CPU rows are checks, not speed
    rows = _rows(out, "backend")
    assert rows == {"reference": "ok", "triton": "ok", "recorder": "ok"} and "skipped sdpa" in out
    svoo = out.split("SVOO (")[1]  # the SVOO part: every path checked on sampled rows
    assert "density" in svoo and "recall" in svoo and "FAILED" not in svoo
    checked = _rows(svoo, "SVOO path")
    assert checked["reference"] == "ok" and checked["triton"] == "ok"  # triton in the interpreter
    assert main([*DEMO_SMALL, "--no-svoo", "--show-map"]) == 0
    out = capsys.readouterr().out
    assert "block map" in out and "\n    29 " in out and "SVOO (" not in out  # the frame map on request


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the timed table runs on CUDA")
def test_demo_times_backends_on_cuda(capsys):
    argv = ["demo", "--frames", "61", "--tokens-per-frame", "256", "--heads", "2", "--head-dim", "64", "--repeats", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "timing: B=1, 61 latent frames" in out and "vs dense" in out and "wall s" not in out
    rows = _rows(out, "backend")
    assert rows.pop("dense") == "baseline" and rows["triton"] == "ok" and set(rows.values()) == {"ok"}
    svoo = _rows(out.split("SVOO (")[1], "SVOO path")
    assert svoo.pop("dense") == "baseline" and svoo["triton"] == "ok" and set(svoo.values()) == {"ok"}


def test_demo_fails_when_a_backend_disagrees(monkeypatch, capsys):
    register_temporarily(monkeypatch, Recorder("broken", factor=1.01))
    assert main(DEMO_SMALL) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out and "FAILED" in out
