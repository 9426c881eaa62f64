"""`import lvsa_kernels` stays light: torch loads with the first export used, Triton on the first kernel call
and torch._dynamo on the first call of a function that must run eagerly under torch.compile (checked in a
fresh interpreter)."""
import subprocess
import sys


def test_import_loads_neither_triton_nor_dynamo():
    code = ("import sys, lvsa_kernels; "
            "print(sorted(m for m in ('triton', 'torch._dynamo', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_import_and_cli_help_load_no_torch():
    """The package exports load on first use, and the command line's --help needs none of them."""
    code = ("import sys, runpy; sys.argv = ['lvsa_kernels', '--help']\n"
            "import lvsa_kernels\nassert 'torch' not in sys.modules\n"
            "try:\n    runpy.run_module('lvsa_kernels', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


def test_lazy_exports_resolve():
    code = ("import lvsa_kernels as m; print(sorted(n for n in m.__all__ if n != '__version__' "
            "and getattr(m, n) is None))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
