"""The one place that decides which face of an op runs: CUDA C++, Triton or the torch reference.

Order of precedence: the op call's `backend=` argument, then the environment variable
ANYGPT_BACKEND (e.g. `torch` to force the reference everywhere, or `linear=triton,lm_head=torch`
to force single ops by name and leave the others to the default), then the default:
CPU tensors take the torch reference; CUDA tensors take the first available of the op's
preferred faces (its tuning table may name the faster one per shape and GPU). When the CUDA face
is preferred but the extension cannot run it, a warning says why, once per process.

Within `with recording() as record:` every choice is counted, so a benchmark can report the faces
its ops ran. choose() runs on the host, also while a CUDA graph is captured: a graph's faces are
recorded at its capture, not at its replays.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch

from anygpt_engine.ops._extension import cuda_kernels_built, cuda_kernels_missing

BACKENDS = ("torch", "cpp", "triton", "cuda")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class FaceRecord:
    """How many calls of each op each face ran while recording."""

    def __init__(self):
        self.counts: dict[str, dict[str, int]] = {}

    def add(self, op: str, face: str, calls: int = 1) -> None:
        faces = self.counts.setdefault(op, {})
        faces[face] = faces.get(face, 0) + calls

    def faces(self) -> dict[str, list[str]]:
        """op -> the faces it ran, sorted; ops in name order."""
        ran = {op: sorted(face for face, calls in faces.items() if calls > 0) for op, faces in self.counts.items()}
        return {op: ran[op] for op in sorted(ran) if ran[op]}


_records: list[FaceRecord] = []


@contextlib.contextmanager
def recording():
    """Records the faces chosen inside the block (FaceRecord); blocks may nest."""
    record = FaceRecord()
    _records.append(record)
    try:
        yield record
    finally:
        _records.remove(record)


def ran_instead(op: str, chosen: str, face: str) -> str:
    """For an op that runs `face` although choose() returned `chosen` (a shape the chosen kernel
    does not take): corrects the records and returns `face`."""
    for record in _records:
        record.add(op, chosen, -1)
        record.add(op, face)
    return face


@functools.lru_cache(maxsize=None)
def _warn_cuda_kernels_missing() -> None:
    warnings.warn(f"{cuda_kernels_missing()}: ops whose CUDA C++ face is preferred run their Triton face (or the "
                  "torch reference) instead; rebuild with `pip install -e .` for this Python and torch",
                  RuntimeWarning, stacklevel=4)


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
    face = _choose(op, device, requested, preferred, supported)
    for record in _records:
        record.add(op, face)
    return face


def _choose(op: str, device: torch.device, requested: str | None, preferred: tuple[str, ...],
            supported: tuple[str, ...]) -> str:
    choice = requested or _from_environment(op)
    if choice is not None:
        if choice not in BACKENDS:
            raise ValueError(f"backend={choice!r} for {op}, expected one of {BACKENDS}")
        if choice not in supported:
            raise ValueError(f"backend={choice!r}: {op} has only {supported}")
        if choice == "cuda" and device.type != "cuda":
            raise ValueError(f"backend='cuda' for {op} needs CUDA tensors, got tensors on {device}")
        if choice == "cuda" and not cuda_kernels_built():
            raise RuntimeError(f"backend='cuda' for {op}: {cuda_kernels_missing()}")
        if choice == "cpp" and device.type != "cpu":
            raise ValueError(f"backend='cpp' for {op} needs CPU tensors, got tensors on {device}")
        if choice == "triton" and not triton_available():
            raise RuntimeError(f"backend='triton' for {op}: triton is not installed")
        return choice
    if device.type != "cuda":
        return "torch"
    for face in preferred:
        if face == "cuda":
            if cuda_kernels_built():
                return face
            _warn_cuda_kernels_missing()
        if face == "triton" and triton_available():
            return face
    return "torch"
