"""SVOO profiles: CSV round trip and validation, the keep-ratio math, the tiny Wan capture and the CLI (CPU)."""
import argparse
import math

import pytest
import torch

from lvsa_kernels import SVOOPattern
from lvsa_kernels.reference import svoo_profile
from lvsa_kernels.reference.svoo_profile import ProfileError, SVOOProfile, keep_ratio_for_mass, sample_query_rows


def _write(path, text):
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------- CSV
def test_csv_round_trip(tmp_path):
    keep = (torch.rand(3, 2, 4, generator=torch.Generator().manual_seed(0)) * 10000).round() / 10000
    SVOOProfile(keep).save(tmp_path / "p.csv")
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == "Step,Layer,Head,Sparsity" and lines[1].startswith("1,0,0,") and lines[-1].startswith("3,1,3,")
    assert len(lines) == 1 + 3 * 2 * 4
    loaded = SVOOProfile.load(tmp_path / "p.csv")
    torch.testing.assert_close(loaded.keep, keep, rtol=0, atol=1e-7)
    assert loaded.keep_ratios(2, 1).shape == (4,)


def test_published_format_loads_unsorted_and_unpadded(tmp_path):
    p = _write(tmp_path / "pub.csv", "Step,Layer,Head,Sparsity\n1,0,1,0.0411\n1,0,0,0.7382\n2,0,0,0.004\n2,0,1,1\n")
    prof = SVOOProfile.load(p)
    assert prof.keep.shape == (2, 1, 2)
    torch.testing.assert_close(prof.keep[:, 0], torch.tensor([[0.7382, 0.0411], [0.004, 1.0]]))


@pytest.mark.parametrize("text, match", [
    ("Step,Layer,Head,Density\n1,0,0,0.5\n", "header"),
    ("Step,Layer,Head,Sparsity\n1,0,0,0.5\n1,0,0,0.4\n", "duplicate"),
    ("Step,Layer,Head,Sparsity\n1,0,0,0.5\n1,0,1,0.5\n2,0,0,0.5\n", r"first missing: step 2, layer 0, head 1"),
    ("Step,Layer,Head,Sparsity\n1,0,0,1.5\n", r"\[0, 1\]"),
    ("Step,Layer,Head,Sparsity\n0,0,0,0.5\n", "Step must be >= 1"),
    ("Step,Layer,Head,Sparsity\n1,0,x,0.5\n", "cannot parse"),
    ("Step,Layer,Head,Sparsity\n1,0,0\n", "4 fields"),
    ("Step,Layer,Head,Sparsity\n", "no rows"),
])
def test_csv_validation_errors(tmp_path, text, match):
    with pytest.raises(ProfileError, match=match):
        SVOOProfile.load(_write(tmp_path / "bad.csv", text))


def test_profile_lookup_and_merge():
    a = SVOOProfile(torch.tensor([[[0.1, 0.6]], [[0.3, 0.2]]]))
    b = SVOOProfile(torch.tensor([[[0.4, 0.5]], [[0.1, 0.9]]]))
    torch.testing.assert_close(a.merge_max(b).keep, torch.tensor([[[0.4, 0.6]], [[0.3, 0.9]]]))
    with pytest.raises(ProfileError, match="step 3"):
        a.keep_ratios(3, 0)
    with pytest.raises(ProfileError, match="grids differ"):
        a.merge_max(SVOOProfile(torch.rand(1, 1, 2)))
    with pytest.raises(ProfileError, match=r"\[0, 1\]"):
        SVOOProfile(torch.tensor([[[1.2]]]))


# ---------------------------------------------------------------------------------------------- profiler math
def _brute_keep(q, k, tau, rows):
    s = torch.einsum("bqhd,bkhd->bhqk", q[:, rows].double(), k.double()) / math.sqrt(q.shape[-1])
    cum = torch.cumsum(torch.sort(torch.softmax(s, -1), -1, descending=True).values, -1)
    need = (cum < tau * cum[..., -1:]).sum(-1) + 1
    return (need.double() / k.shape[1]).mean(dim=(0, 2))


@pytest.mark.parametrize("num_queries", [None, 7, 1])
def test_keep_ratio_matches_brute_force_in_small_chunks(monkeypatch, num_queries):
    monkeypatch.setattr(svoo_profile, "_CHUNK_ELEMENTS", 500)  # several query chunks
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 50, 3, 8, generator=g) * 2, torch.randn(2, 60, 3, 8, generator=g)
    rows = sample_query_rows(50, num_queries)
    got = keep_ratio_for_mass(q, k, 0.95, num_queries)
    torch.testing.assert_close(got.double(), _brute_keep(q, k, 0.95, rows), rtol=0, atol=1e-6)


def test_keep_ratio_gqa_and_extremes():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 20, 4, 8, generator=g), torch.randn(1, 30, 2, 8, generator=g)
    got = keep_ratio_for_mass(q, k)
    ref = _brute_keep(q, k.repeat_interleave(2, dim=2), 0.95, torch.arange(20))
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(keep_ratio_for_mass(q, k, tau=1e-6), torch.full((4,), 1 / 30))  # top key alone
    with pytest.raises(ValueError, match="tau"):
        keep_ratio_for_mass(q, k, tau=0)


def test_sample_query_rows():
    assert sample_query_rows(9, 1).tolist() == [4]
    assert sample_query_rows(9, 3).tolist() == [0, 4, 8]
    assert sample_query_rows(3, 10).tolist() == [0, 1, 2]
    assert sample_query_rows(5, 4).tolist() == [0, 1, 3, 4]


# ---------------------------------------------------------------------------------------------- tiny Wan
@pytest.fixture(scope="module")
def tiny_wan():
    diffusers = pytest.importorskip("diffusers")
    from lvsa_kernels.commands.profile import TINY_WAN

    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**TINY_WAN).eval()
    g = torch.Generator().manual_seed(3)
    inputs = dict(hidden_states=torch.randn(1, 4, 2, 16, 16, generator=g),
                  encoder_hidden_states=torch.randn(1, 12, 16, generator=g), timestep=torch.tensor([500.0]))
    return model, inputs


@torch.no_grad()
def _run_with(model, inputs, attend):
    from lvsa_kernels.diffusers.wan_profile import install_wan_processors

    previous = install_wan_processors(model, attend)
    try:
        return model(**inputs, return_dict=False)[0]
    finally:
        model.set_attn_processor(previous)


@torch.no_grad()
def test_capture_processor_reproduces_wan_and_sees_post_rope_qk(tiny_wan):
    from lvsa_kernels.diffusers.wan_profile import sdpa_bshd

    model, inputs = tiny_wan
    dense = model(**inputs, return_dict=False)[0]
    seen = {}

    def attend(layer, q, k, v):
        seen[layer] = (q.shape, k.shape)
        return sdpa_bshd(q, k, v)

    torch.testing.assert_close(_run_with(model, inputs, attend), dense)
    assert seen == {0: ((1, 128, 2, 12),) * 2, 1: ((1, 128, 2, 12),) * 2}


def test_tiny_wan_with_svoo_top_p_one_equals_dense_and_sparse_runs(tiny_wan):
    model, inputs = tiny_wan
    with torch.no_grad():
        dense = model(**inputs, return_dict=False)[0]
    full = SVOOPattern(top_p=1.0, q_clusters=8, k_clusters=16, warmup_steps=0)
    out = _run_with(model, inputs, lambda layer, q, k, v: full.attention(q, k, v, 0, layer, backend="reference"))
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)
    sparse = SVOOPattern(top_p=0.5, q_clusters=8, k_clusters=16, warmup_steps=0)
    densities = []

    def attend(layer, q, k, v):
        densities.append(sparse.plan(q, k, 0, layer).layouts[0].density)
        return sparse.attention(q, k, v, 0, layer, backend="reference")

    out = _run_with(model, inputs, attend)
    assert torch.isfinite(out).all() and max(densities) < 1


def test_profile_wan_and_cli_csv_loads_into_pattern(tiny_wan, tmp_path):
    from lvsa_kernels.diffusers.wan_profile import profile_wan

    model, inputs = tiny_wan
    lat = [inputs["hidden_states"], inputs["hidden_states"] * 0.5 + 0.1]
    emb = [inputs["encoder_hidden_states"]] * 2
    both = profile_wan(model, lat, emb, num_steps=2)
    first = profile_wan(model, lat[:1], emb[:1], num_steps=2)
    second = profile_wan(model, lat[1:], emb[1:], num_steps=2)
    assert both.keep.shape == (2, 2, 2) and (both.keep > 0).all() and (both.keep <= 1).all()
    torch.testing.assert_close(both.keep, first.merge_max(second).keep)
    assert all(type(p).__name__ != "WanSelfAttnProcessor" for p in model.attn_processors.values())

    from lvsa_kernels.commands import profile as cmd

    parser = argparse.ArgumentParser()
    cmd.add_arguments(parser)
    out = tmp_path / "wan_tiny.csv"
    args = parser.parse_args(["--model", "wan", "--tiny", "--out", str(out), "--steps", "2", "--inputs", "1",
                              "--latent", "2", "8", "8"])
    assert cmd.run(args) == 0
    pat = SVOOPattern(profile=str(out), k_clusters=100, clip=(0.0, 1.0))
    loaded = SVOOProfile.load(out)
    assert loaded.keep.shape == (2, 2, 2)
    assert pat.min_blocks(1, 1, 2).tolist() == [int(float(r) * 100) for r in loaded.keep_ratios(2, 1)]


def test_profile_csv_that_is_not_utf8_is_a_profile_error(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes(b"Step,Layer,Head,Sparsity\n1,0,0,0.5\xff\xfe\n")
    with pytest.raises(ProfileError, match="not UTF-8"):
        SVOOProfile.load(path)


@pytest.mark.parametrize("row", ["1000000000,0,0,0.5", "1,2000000000,0,0.5", "1,0,3000000000,0.5"])
def test_absurd_profile_indices_fail_before_allocating(tmp_path, row, monkeypatch):
    """An index of 10^9 would allocate a 10^9-entry grid: the completeness check comes first."""
    path = tmp_path / "p.csv"
    path.write_text(f"Step,Layer,Head,Sparsity\n1,0,0,0.5\n{row}\n")
    real_full, real_empty = torch.full, torch.empty

    def small(alloc):
        def checked(*size, **kw):
            shape = size[0] if len(size) == 1 and isinstance(size[0], tuple) else size[:3]
            assert math.prod(s for s in shape if isinstance(s, int)) < 10 ** 6, f"allocated {shape}"
            return alloc(*size, **kw)
        return checked
    monkeypatch.setattr(torch, "full", small(real_full))
    monkeypatch.setattr(torch, "empty", small(real_empty))
    with pytest.raises(ProfileError, match="incomplete grid.*first missing"):
        SVOOProfile.load(path)


def test_single_sample_is_the_middle_query_n_div_2():
    """The published profiler samples query n // 2 (for even n the upper middle)."""
    assert sample_query_rows(10, 1).tolist() == [5]
    assert sample_query_rows(9, 1).tolist() == [4]
