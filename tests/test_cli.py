"""Command-line values: every bad value is an argparse usage error (exit 2) naming the option and the value,
never a traceback."""
import pytest
import torch

from lvsa_kernels.__main__ import main

BAD = [
    (["demo", "--frames", "0"], "--frames", "'0'"),
    (["demo", "--heads", "two"], "--heads", "'two'"),
    (["demo", "--repeats", "-1"], "--repeats", "'-1'"),
    (["demo", "--step", "-2"], "--step", "'-2'"),
    (["demo", "--dtype", "float64"], "--dtype", "'float64'"),
    (["demo", "--model", "sora"], "--model", "'sora'"),
    (["plan", "--frames", "-3"], "--frames", "'-3'"),
    (["plan", "--frames", "30", "--scale", "0"], "--scale", "'0'"),
    (["plan", "--frames", "30", "--scale", "nan"], "--scale", "'nan'"),
    (["plan", "--frames", "30", "--window", "1.5"], "--window", "'1.5'"),
    (["plan", "--model", "wan", "--frames", "30", "--text-tokens", "5"], "--text-tokens", "5"),
    (["plan", "--frames", "30", "--video-frames", "81"], "--video-frames", "--frames"),
    (["profile", "--model", "wan", "--tiny", "--out", "p.csv", "--tau", "1.5"], "--tau", "'1.5'"),
    (["profile", "--model", "wan", "--tiny", "--out", "p.csv", "--steps", "0"], "--steps", "'0'"),
    (["profile", "--model", "wan", "--tiny", "--out", "p.csv", "--latent", "2", "15", "16"], "--latent", "2 15 16"),
    (["profile", "--model", "wan", "--tiny", "--out", "p.csv", "--latent", "2", "80", "80"], "--latent", "2 80 80"),
    (["profile", "--model", "wan", "--tiny", "--out", "/no/such/folder/p.csv"], "--out", "/no/such/folder/p.csv"),
    (["tune", "--frames", "zero"], "--frames", "'zero'"),
    (["tune", "--dtype", "fp32"], "--dtype", "'fp32'"),
    (["backends", "--jsn"], "--jsn", "--jsn"),
]


@pytest.mark.parametrize("argv, option, value", BAD, ids=[" ".join(a) for a, _, _ in BAD])
def test_bad_value_is_a_usage_error(argv, option, value, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    last = err.strip().splitlines()[-1]  # "python -m lvsa_kernels <command>: error: argument --x: ... got 'v'"
    assert "error:" in last and option in last and value in last and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_demo_on_missing_cuda_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--device", "cuda"])
    assert exc.value.code == 2 and "argument --device: no CUDA device is available" in capsys.readouterr().err


def test_demo_help_states_the_horizon_it_plans(capsys):
    """The command list and ``demo --help`` give the default horizon as the demo prints it (121 frames, 5.8x)."""
    with pytest.raises(SystemExit):
        main(["--help"])
    listing = " ".join(capsys.readouterr().out.split())
    assert "5.8x its 21-frame horizon" in listing and "6x" not in listing


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU reason shown without a GPU")
def test_backends_says_demo_runs_triton_in_the_interpreter(monkeypatch, capsys):
    """Without TRITON_INTERPRET, `backends` lists Triton as unavailable on CPU and says why `demo` still ran it."""
    from lvsa_kernels.triton_src import tuning

    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "cpu: CPU tensors run only in Triton's interpreter" in out
    assert "`python -m lvsa_kernels demo` sets it itself when there is no CUDA" in out
