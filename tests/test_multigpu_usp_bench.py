"""bench/multigpu_usp.py: its CPU-checkable logic (shapes, degrees, planned traffic, NVLink-multicast guard) and
a gloo dry run (torchrun on 1, then 2 CPU processes with ring_degree=2, tiny config)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
from lvsa_kernels.bench import multigpu_step, multigpu_usp  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "multigpu_usp.py"


def test_defaults_are_wan_14b_at_720p_and_121_latent_frames():
    args = multigpu_usp.parse_args(["--ref", "r.pt"])
    config = multigpu_usp.model_config(args)
    assert (config["num_attention_heads"], config["attention_head_dim"], config["ffn_dim"]) == (40, 128, 13824)
    assert config["num_layers"] == 4 and args.ulysses_degree == 1
    assert (args.backend, args.dense_backend) == ("triton", "_native_cudnn")
    assert multigpu_usp.grid(config, args.frames, args.height, args.width) == (121, 3600)


def test_degrees():
    assert multigpu_usp.degrees(8, 1, 40) == (8, 1)
    assert multigpu_usp.degrees(8, 2, 40) == (4, 2)
    assert multigpu_usp.degrees(1, 1, 40) == (1, 1)
    with pytest.raises(ValueError, match="--ulysses-degree 3 does not divide the world size 8"):
        multigpu_usp.degrees(8, 3, 40)
    with pytest.raises(ValueError, match="--ulysses-degree 8 does not divide the 12 attention heads"):
        multigpu_usp.degrees(8, 8, 12)


def test_planned_traffic_meets_the_target_at_8_ranks():
    assert multigpu_usp.planned_traffic_ratio(121, 3600, 1, {}) is None
    assert multigpu_usp.planned_traffic_ratio(121, 3600, 8, {}) == pytest.approx(0.1736, abs=1e-4)


@pytest.mark.parametrize("name, value", [("NCCL_NVLS_ENABLE", "1"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "0")])
def test_nvlink_multicast_must_stay_off(monkeypatch, name, value):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("NCCL_NVLS_ENABLE", raising=False)
    monkeypatch.delenv("TORCH_SYMM_MEM_DISABLE_MULTICAST", raising=False)
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit, match=f"{name}={value}; NVLink multicast must stay off"):
        multigpu_step.init_distributed("cuda")
    assert os.environ["NCCL_NVLS_ENABLE"] == ("1" if name == "NCCL_NVLS_ENABLE" else "0")


def _torchrun(nproc: int, tmp: Path, *extra: str) -> None:
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                    str(SCRIPT), "--device", "cpu", "--tiny", "--repeats", "1", "--ref", str(tmp / "ref.pt"),
                    "--json-out", str(tmp / f"usp{nproc}.json"), *extra], check=True, cwd=tmp, timeout=300)


def test_cpu_dry_run_ring_equals_one_process(tmp_path):
    _torchrun(1, tmp_path)
    _torchrun(2, tmp_path)
    got = json.loads((tmp_path / "usp2.json").read_text())
    meta, lvsa, dense = got["meta"], got["results"]["lvsa"], got["results"]["dense"]
    assert meta["dry_run"] and (meta["ring_degree"], meta["ulysses_degree"]) == (2, 1)
    assert meta["weights_match_reference"]
    assert lvsa["matches_1gpu"] and lvsa["rel_diff_vs_1gpu"] <= 1e-5
    assert 0 < lvsa["ring_traffic_ratio"] < 1 and "efficiency" not in lvsa
    assert dense["status"].startswith("skipped: diffusers' dense ring (ring_degree=2) needs a backend returning lse")
