"""`import lvsa_kernels` stays light: Triton is imported on the first kernel call and torch._dynamo on the first
call of a function that must run eagerly under torch.compile (checked in a fresh interpreter)."""
import subprocess
import sys


def test_import_loads_neither_triton_nor_dynamo():
    code = ("import sys, lvsa_kernels; "
            "print(sorted(m for m in ('triton', 'torch._dynamo', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
