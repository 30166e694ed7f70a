"""The one place that decides which implementation runs an op.

``auto`` (the default) runs the Triton kernels on CUDA tensors and the vectorised
PyTorch path on everything else. ``set_backend`` or the ``HETMM_BACKEND``
environment variable force one of ``triton``, ``torch`` or ``reference``.
"""

from __future__ import annotations

import contextlib
import os

import torch

BACKENDS = ("auto", "triton", "torch", "reference")

_forced: str | None = None


def _check_name(name: str, source: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name.lower()


def set_backend(name: str | None) -> None:
    """Force a backend for every op (``None`` or ``"auto"`` restores the default)."""
    global _forced
    _forced = None if name is None else _check_name(name, "backend")


def get_backend() -> str:
    """The backend in force: the one set by ``set_backend``, else ``HETMM_BACKEND``, else ``auto``."""
    if _forced is not None:
        return _forced
    env = os.environ.get("HETMM_BACKEND")
    return _check_name(env, "HETMM_BACKEND") if env else "auto"


@contextlib.contextmanager
def use_backend(name: str | None):
    """Context manager form of ``set_backend``: restores the previous choice on exit."""
    global _forced
    previous = _forced
    set_backend(name)
    try:
        yield
    finally:
        _forced = previous


def triton_interpreted() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve(device: torch.device, backend: str | None = None, dtype: torch.dtype | None = None) -> str:
    """The concrete backend (``triton``, ``torch`` or ``reference``) for tensors on ``device``.

    ``auto`` runs float64 on the torch path (the Triton kernels multiply 16- and 32-bit floats).
    """
    name = _check_name(backend, "backend") if backend is not None else get_backend()
    if dtype == torch.float64 and name in ("auto", "triton"):
        if name == "triton":
            raise TypeError("the triton backend takes float32, float16 or bfloat16; use the torch backend for float64")
        return "torch"
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if name == "triton" and device.type != "cuda" and not triton_interpreted():
        raise RuntimeError(
            f"the triton backend needs CUDA tensors (got tensors on {device}); "
            "set TRITON_INTERPRET=1 before importing hetmm_kernels to run the kernels "
            "on the CPU, or use the 'torch' backend"
        )
    return name
