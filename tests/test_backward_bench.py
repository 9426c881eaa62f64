"""`bench/backward_bench.py --cpu-smoke`: the GPU benchmark's plumbing (gradient check, timing, JSON) on CPU."""
import json

from lvsa_kernels.bench import backward_bench


def test_cpu_smoke_checks_gradients_and_writes_json(tmp_path):
    assert backward_bench.main(["--cpu-smoke", "--rep-ms", "1", "--min-iters", "1", "--out", str(tmp_path),
                                "--dkdv-sweep", "16x16x1x1,16x16x1x1+dq", "--dq-sweep", "16x16x1x1,32x16x1x1"]) == 0
    doc = json.loads((tmp_path / backward_bench.JSON_NAME).read_text())
    check = doc["gradient_check"]["methods"]["ours"]
    assert check["ok"] and max(check["dq"], check["dk"], check["dv"]) <= 1e-5
    assert doc["skipped_methods"] == {"flex": "FlexAttention has no backward on CPU"}
    (sweep,) = doc["kernel_sweeps"]
    assert set(sweep["dkdv"]) == {"16x16x1x1"} and set(sweep["dq"]) == {"16x16x1x1", "32x16x1x1"}
    assert all(r["status"] == "ok" and r["rel_err_vs_first"] <= 1e-6 for r in sweep["dq"].values())
    # the single-pass variant's dk, dv and atomically summed dq against the plain kernels'
    assert sweep["dkdv_single_pass"]["16x16x1x1+dq"]["rel_err_vs_first"] <= 1e-5
    # the fastest dK/dV and dQ tiles are timed together unless that pair is the default already
    timed = {f"ours_{sweep['best_dkdv']}_{sweep['best_dq']}", "ours_16x16x1x1_16x16x1x1"}
    (case,) = doc["cases"]
    assert {r["status"] for r in case["methods"].values()} == {"ok"}
    assert set(case["methods"]) == timed | {"dense_cudnn"}
    assert case["summary"]["best_ours"] in timed


def test_bad_backward_config_is_rejected(capsys):
    assert backward_bench.main(["--cpu-smoke", "--bwd-configs", "64x64"]) == 2
    assert "--bwd-configs: expected DKDV/DQ like 64x128x8x2/128x128x8x2, DKDV/single" in capsys.readouterr().err
