"""Ascend NPU support (installed as ``lvsa_kernels.npu``): torch_npu detection (`detect`), layout-to-call
planning (`groups`) and the ``npu`` backend (`backend`, registered by ``lvsa_kernels.backends``).
torch_npu is optional and never imported unless it is installed."""
