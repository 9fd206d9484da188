"""Access to the compiled extension anygpt_engine._C and shared argument checks for ops."""

from __future__ import annotations

import functools

import torch

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
FLOAT_TYPES = tuple(_DTYPE_CODES)


@functools.lru_cache(maxsize=None)
def _import():
    """The module, or the ImportError its import raised: cached either way, so a broken install
    costs one failed import, not one per op call (lru_cache alone does not cache exceptions)."""
    try:
        from anygpt_engine import _C
    except ImportError as err:
        return err
    return _C


def extension():
    """The compiled module; ImportError with a rebuild hint when it is missing."""
    loaded = _import()
    if isinstance(loaded, ImportError):
        raise ImportError(
            "anygpt_engine._C is not built; reinstall with `pip install -e .` "
            f"(or `pip install --no-build-isolation --no-deps -e .` offline): {loaded}"
        ) from loaded
    return loaded


def has_extension() -> bool:
    return not isinstance(_import(), ImportError)


def cuda_kernels_built() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return has_extension() and bool(_import().built_with_cuda)


def cuda_kernels_missing() -> str | None:
    """Why the CUDA kernels cannot run (None when they can): the failed import or a CPU-only build."""
    loaded = _import()
    if isinstance(loaded, ImportError):
        return f"anygpt_engine._C failed to import ({loaded})"
    if not loaded.built_with_cuda:
        return "anygpt_engine._C was built without CUDA kernels"
    return None


def dtype_code(name: str, tensor: torch.Tensor) -> int:
    try:
        return _DTYPE_CODES[tensor.dtype]
    except KeyError:
        raise TypeError(f"{name}.dtype={tensor.dtype}, expected float32, float16 or bfloat16") from None


def cuda_stream_handle(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def on_tensor_device(launch):
    """Runs a kernel launch function with its first tensor argument's GPU as the current device:
    Triton and the CUDA runtime launch on the current device, so without this guard an engine
    on cuda:1 would launch its kernels on cuda:0. Free when that device is already current."""

    @functools.wraps(launch)
    def guarded(*args, **kwargs):
        device = next((a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if device is None or device.type != "cuda" or device.index in (None, torch.cuda.current_device()):
            return launch(*args, **kwargs)
        with torch.cuda.device(device):
            return launch(*args, **kwargs)

    return guarded


def check_tensor(name: str, t, dims: int | None = None, dtypes=None, device=None) -> None:
    """A tensor with `dims` dimensions, one of `dtypes`, on `device` (each check when given)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name}.shape={tuple(t.shape)}, expected {dims} dimensions")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}.dtype={t.dtype}, expected one of {[str(d) for d in dtypes]}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")


def check_same(name: str, tensor: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    """Same device and dtype as the op's main input."""
    if tensor.device != like.device:
        raise ValueError(f"{name} is on {tensor.device}, expected {like.device} like {like_name}")
    if tensor.dtype != like.dtype:
        raise TypeError(f"{name}.dtype={tensor.dtype}, expected {like.dtype} like {like_name}")


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, features] with unit column stride; rows may be strided (no copy when possible).
    Rows closer than a row apart (a broadcast x) are copied: the kernels read whole rows."""
    features = x.shape[-1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    try:
        rows = x.view(-1, features)
    except RuntimeError:  # leading dims not collapsible
        return x.contiguous().view(-1, features)
    return rows if rows.shape[0] <= 1 or rows.stride(0) >= features else rows.contiguous()
