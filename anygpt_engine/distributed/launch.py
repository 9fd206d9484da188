"""Joining the process group torchrun describes in the environment (never spawning ranks)."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def init_from_env(timeout_s: float = 120.0, backend: str | None = None) -> torch.device:
    """Initialises the default group from torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT, LOCAL_RANK) unless it exists, and returns this rank's device: cuda:LOCAL_RANK
    with NCCL where GPUs exist, else the CPU with gloo. `timeout_s` bounds every collective, so a
    hung rank ends the others with an error instead of a silent hang."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if not dist.is_initialized() and missing:
        raise RuntimeError(f"tensor parallelism needs torchrun's environment ({', '.join(missing)} unset): launch "
                           "with torchrun --nproc-per-node N -m anygpt_engine ... (docs/distributed.md)")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s={timeout_s!r}, expected > 0")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return device
