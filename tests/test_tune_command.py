"""`python -m lvsa_kernels tune`: the on-disk config cache is written, reloaded and shown."""
import json

import pytest
import torch

from lvsa_kernels.__main__ import main
from lvsa_kernels.triton_src import tuning


def test_show_lists_stored_configs_and_a_second_process_reads_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LVSA_KERNELS_CACHE_DIR", str(tmp_path))
    cfg = tuning.KernelConfig(128, 64, 8, 3, True, False)
    tuning.store("GPU X|triton-3.6|bfloat16|d128|qb2^10", cfg)
    data = json.loads((tmp_path / "triton_configs.json").read_text())
    assert tuning.KernelConfig(**data["entries"]["GPU X|triton-3.6|bfloat16|d128|qb2^10"]) == cfg
    monkeypatch.setattr(tuning, "_memory", {})          # a fresh process: nothing in memory
    monkeypatch.setattr(tuning, "_loaded_from", None)
    assert tuning.lookup("GPU X|triton-3.6|bfloat16|d128|qb2^10") == cfg
    assert main(["tune", "--show"]) == 0
    out = capsys.readouterr().out
    assert "GPU X|triton-3.6|bfloat16|d128|qb2^10" in out and "BLOCK_N=64" in out and "tma=True" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_tune_without_cuda_says_why(capsys):
    assert main(["tune", "--frames", "41"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out
