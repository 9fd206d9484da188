"""Access to the compiled extension anygpt_engine._C and shared argument checks for ops."""

from __future__ import annotations

import functools

import torch

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@functools.lru_cache(maxsize=None)
def extension():
    """The compiled module; ImportError with a rebuild hint when it is missing."""
    try:
        from anygpt_engine import _C
    except ImportError as err:  # pragma: no cover - only on a broken install
        raise ImportError(
            "anygpt_engine._C is not built; reinstall with `pip install -e .` "
            f"(or `pip install --no-build-isolation --no-deps -e .` offline): {err}"
        ) from err
    return _C


def has_extension() -> bool:
    try:
        extension()
    except ImportError:
        return False
    return True


def cuda_kernels_built() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return has_extension() and bool(extension().built_with_cuda)


def dtype_code(name: str, tensor: torch.Tensor) -> int:
    try:
        return _DTYPE_CODES[tensor.dtype]
    except KeyError:
        raise TypeError(f"{name}.dtype={tensor.dtype}, expected float32, float16 or bfloat16") from None


def cuda_stream_handle(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def check_same(name: str, tensor: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    """Same device and dtype as the op's main input."""
    if tensor.device != like.device:
        raise ValueError(f"{name} is on {tensor.device}, expected {like.device} like {like_name}")
    if tensor.dtype != like.dtype:
        raise TypeError(f"{name}.dtype={tensor.dtype}, expected {like.dtype} like {like_name}")
