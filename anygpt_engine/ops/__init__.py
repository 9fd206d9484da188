"""Ops of anygpt_engine: each module has a torch reference and picks its face in one place
(ops.backend.choose). Callers use these functions, never the kernels directly."""

from anygpt_engine.ops.rms_norm import rms_norm, rms_norm_reference

__all__ = ["rms_norm", "rms_norm_reference"]
