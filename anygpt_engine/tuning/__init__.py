"""Kernel tuning tables: one JSON file per op in this folder, read once.

Format: {"default": {...params...}, "gpus": {"<substring of the GPU name>": {...}}}.
The first GPU entry whose key occurs in the device name overrides the default's keys.
benchmarks/ tuning scripts write these files; code never hard-codes block sizes.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

_FOLDER = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=None)
def _table(op: str) -> dict:
    path = _FOLDER / f"{op}.json"
    if not path.exists():
        raise FileNotFoundError(f"no tuning table for op {op!r} at {path}")
    return json.loads(path.read_text())


@functools.lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def params(op: str, device: torch.device) -> dict:
    """Tuned launch parameters of `op` on `device`."""
    table = _table(op)
    chosen = dict(table["default"])
    name = _device_name(device)
    for key, override in table.get("gpus", {}).items():
        if key in name:
            chosen.update(override)
            break
    return chosen
