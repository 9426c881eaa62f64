"""`bench/backward_bench.py --cpu-smoke`: the GPU benchmark's plumbing (gradient check, timing, JSON) on CPU."""
import json

from lvsa_kernels.bench import backward_bench


def test_cpu_smoke_checks_gradients_and_writes_json(tmp_path):
    assert backward_bench.main(["--cpu-smoke", "--rep-ms", "1", "--min-iters", "1", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / backward_bench.JSON_NAME).read_text())
    check = doc["gradient_check"]["methods"]["ours"]
    assert check["ok"] and max(check["dq"], check["dk"], check["dv"]) <= 1e-5
    assert doc["skipped_methods"] == {"flex": "FlexAttention has no backward on CPU"}
    (case,) = doc["cases"]
    assert {r["status"] for r in case["methods"].values()} == {"ok"} and set(case["methods"]) == {
        "ours_16x16x1x1", "dense_cudnn"}
    assert case["summary"]["best_ours"] == "ours_16x16x1x1"


def test_bad_backward_config_is_rejected(capsys):
    assert backward_bench.main(["--cpu-smoke", "--bwd-configs", "64x64"]) == 2
    assert "--bwd-configs: expected block_m x block_n x warps x stages" in capsys.readouterr().err
