"""`bench/generate_step.py --tiny` on CPU: the GPU benchmark's whole path (build, save_pretrained, load, dense and
LVSA generations through generate's helpers, timing hooks, output difference, JSON) on tiny configs."""
import json

import pytest

pytest.importorskip("diffusers")
from lvsa_kernels.bench import generate_step  # noqa: E402


def test_tiny_wan_dense_vs_lvsa_writes_json(tmp_path):
    out = tmp_path / "gen.json"
    assert generate_step.main(["--tiny", "--device", "cpu", "--frames", "25", "--height", "32", "--width", "32",
                               "--steps", "2", "--backend", "reference", "--dir", str(tmp_path / "pipe"),
                               "--json-out", str(out)]) == 0
    result = json.loads(out.read_text())
    dense, lvsa = result["rows"]
    assert (dense["attention"], lvsa["attention"]) == ("dense", "lvsa")
    assert dense["calls"] == lvsa["calls"] == 4 and dense["calls_per_step"] == 2      # CFG: 2 calls per step
    assert dense["density"] == "1.0000 (dense)" and lvsa["backend"] == "reference"
    assert float(lvsa["density"].split()[0]) < 1.0                                   # --tiny: a sparse pattern
    assert result["speedup"] == pytest.approx(dense["call_median_s"] / lvsa["call_median_s"])
    assert 0 < result["first_call_rel_l2"] < 1 and 0 < result["latents_rel_l2"] < 1
    assert result["meta"]["layers"] == 2 and not result["meta"]["full_depth"]
    with pytest.raises(ValueError, match="another transformer config"):             # a stale --dir is refused
        generate_step.main(["--tiny", "--device", "cpu", "--layers", "1", "--dir", str(tmp_path / "pipe")])


def test_layers_option_is_checked():
    assert generate_step.transformer_config("hunyuan15", False, 20)["num_layers"] == 20
    with pytest.raises(ValueError, match=r"--layers: expected 1\.\.30 for wan, got 31"):
        generate_step.transformer_config("wan", False, 31)
