"""The one place that decides which face of an op runs: CUDA C++, Triton or the torch reference.

Order of precedence: the op call's `backend=` argument, then the environment variable
ANYGPT_BACKEND (e.g. `torch` to force the reference everywhere, or `linear=triton,lm_head=torch`
to force single ops by name and leave the others to the default), then the default:
CPU tensors take the torch reference; CUDA tensors take the first available of the op's
preferred faces (its tuning table may name the faster one per shape and GPU).
"""

from __future__ import annotations

import os

import torch

from anygpt_engine.ops._extension import cuda_kernels_built

BACKENDS = ("torch", "cpp", "triton", "cuda")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _from_environment(op: str) -> str | None:
    """ANYGPT_BACKEND's face for `op`: the whole value, or this op's entry of `op=face,...`."""
    value = os.environ.get("ANYGPT_BACKEND") or None
    if value is None or "=" not in value:
        return value
    for entry in value.split(","):
        name, _, face = entry.partition("=")
        if not face:
            raise ValueError(f"ANYGPT_BACKEND={value!r}: expected a face or comma-separated op=face entries")
        if name.strip() == op:
            return face.strip()
    return None


def choose(op: str, device: torch.device, requested: str | None, preferred: tuple[str, ...],
           supported: tuple[str, ...]) -> str:
    """Backend for one call of `op` on `device`.

    `preferred` lists the faces to try on a GPU, fastest first; `supported` is every face
    the op has. An explicit request that cannot run raises instead of silently falling back.
    """
    choice = requested or _from_environment(op)
    if choice is not None:
        if choice not in BACKENDS:
            raise ValueError(f"backend={choice!r} for {op}, expected one of {BACKENDS}")
        if choice not in supported:
            raise ValueError(f"backend={choice!r}: {op} has only {supported}")
        if choice == "cuda" and device.type != "cuda":
            raise ValueError(f"backend='cuda' for {op} needs CUDA tensors, got tensors on {device}")
        if choice == "cuda" and not cuda_kernels_built():
            raise RuntimeError(f"backend='cuda' for {op}: anygpt_engine._C was built without CUDA kernels")
        if choice == "cpp" and device.type != "cpu":
            raise ValueError(f"backend='cpp' for {op} needs CPU tensors, got tensors on {device}")
        if choice == "triton" and not triton_available():
            raise RuntimeError(f"backend='triton' for {op}: triton is not installed")
        return choice
    if device.type != "cuda":
        return "torch"
    for face in preferred:
        if face == "cuda" and cuda_kernels_built():
            return face
        if face == "triton" and triton_available():
            return face
    return "torch"
