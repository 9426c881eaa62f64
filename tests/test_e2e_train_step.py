"""`bench/e2e_step.py --train --tiny` on CPU: the GPU training-step benchmark's whole path (trainable tiny Wan with
gradient checkpointing, dense and LVSA steps with the Triton forward and backward kernels in the interpreter,
forward / backward split, gradient checks, JSON) and its RESULTS.md table."""
import json

import pytest

pytest.importorskip("diffusers")
from lvsa_kernels.bench import e2e_step, write_step_results  # noqa: E402


def test_tiny_training_step_writes_json_and_table(tmp_path):
    out, md = tmp_path / "train.json", tmp_path / "RESULTS.md"
    assert e2e_step.main(["--train", "--device", "cpu", "--tiny", "--json-out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["meta"]["train"] and doc["meta"]["repeats"] == 2
    assert "both ways" in doc["meta"]["train_step"]["gradient_checkpointing"]
    (row,) = doc["results"]
    assert (row["frames"], row["latent_frames"], row["backend"]) == (17, 5, "triton") and row["frame_density"] < 1
    assert row["dense_cudnn"]["status"].startswith("skipped") and row["grad_probe"] == e2e_step.GRAD_PROBE
    dense, lvsa = row["dense_default"], row["lvsa"]
    for way in (dense, lvsa):
        assert way["status"] == "ok" and way["nonfinite_grads"] == 0 and way["loss"] > 0
        assert 0 < way["forward_seconds"] and 0 < way["backward_seconds"]
    assert row["trainable_params"] == 40240 and row["nonfinite"] == 0
    assert row["speedup_vs_dense_default"] == pytest.approx(dense["seconds"] / lvsa["seconds"])
    assert row["rel_diff_loss"] < 1e-2 and 0 < row["rel_l2_grad"] < 1               # the tiny pattern's effect
    assert write_step_results.main(["--e2e-train", str(out), "--md", str(md)]) == 0
    table = md.read_text()
    assert "<!-- e2e-train:start -->" in table and f"| 17 | 5 | 80 | 0.800 | {dense['seconds']:.2f} (" in table


@pytest.mark.parametrize("extra, message", [
    (["--hunyuan"], "--hunyuan: the training step (--train) covers Wan only"),
    (["--precision", "fp8"], "--precision fp8: 8-bit attention has no backward"),
])
def test_train_refuses_what_it_does_not_cover(extra, message, capsys):
    with pytest.raises(SystemExit) as exc:
        e2e_step.parse_args(["--train", "--tiny", "--device", "cpu", *extra])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_train_defaults():
    args = e2e_step.parse_args(["--train"])
    assert (args.repeats, args.dense_default) == (2, False)
    args = e2e_step.parse_args([])
    assert (args.repeats, args.dense_default) == (3, True)
