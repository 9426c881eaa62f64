"""Attention backends. Importing this package registers every backend that is built in."""
from .base import Backend, BackendUnavailable, Capabilities, get_backend, register, registered_backends
from . import reference_backend, sdpa_backend, triton_backend  # noqa: F401  (registration side effects)
from . import flashinfer_backend  # noqa: F401  (registration side effects)
from ..npu import backend as npu_backend  # noqa: F401  (registration side effects)

__all__ = ["Backend", "BackendUnavailable", "Capabilities", "get_backend", "register", "registered_backends"]
