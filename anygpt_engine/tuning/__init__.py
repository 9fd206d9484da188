"""Kernel tuning tables: one JSON file per op in this folder, read once.

Format: {"default": {...params...}, "gpus": {"<substring of the GPU name>": {...}}}.
Every GPU entry whose key occurs in the device name overrides the default's keys, longer keys
last.
benchmarks/ tuning scripts write these files (write_gpu_entry) after timing candidates under
override(); code never hard-codes block sizes.

params(op, device) runs on every op call, so its merged result is memoised per (op, device);
override(), write_gpu_entry() and reload() clear the memo.
"""

from __future__ import annotations

import contextlib
import functools
import json
import types
from collections.abc import Mapping
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


_overrides: dict[str, dict] = {}
_memo: dict[tuple[str, torch.device], Mapping] = {}


def params(op: str, device: torch.device) -> Mapping:
    """Tuned launch parameters of `op` on `device` (with any active override() on top), read-only:
    the same mapping is returned until the table or an override changes."""
    try:
        return _memo[op, device]
    except KeyError:
        chosen = _memo[op, device] = types.MappingProxyType(params_for(op, _device_name(device)))
        return chosen


def reload() -> None:
    """Reads the tables from _FOLDER again on the next params() (after the files or _FOLDER change)."""
    _table.cache_clear()
    _memo.clear()


def params_for(op: str, name: str) -> dict:
    """Tuned launch parameters of `op` on a device called `name` ("cpu" or a GPU's name)."""
    table = _table(op)
    chosen = dict(table["default"])
    # Every entry whose key occurs in the name applies, longer (more specific) keys last: a
    # measured "NVIDIA H100 80GB HBM3" entry refines the hand-written "H100" one.
    for key, entry in sorted(table.get("gpus", {}).items(), key=lambda item: len(item[0])):
        if key in name:
            chosen.update(entry)
    chosen.update(_overrides.get(op, {}))
    return chosen


@contextlib.contextmanager
def override(op: str, **values):
    """Within the block, params(op, ...) returns these values: how a sweep times candidates."""
    unknown = set(values) - set(_table(op)["default"])
    if unknown:
        raise KeyError(f"{op} tuning has no parameters {sorted(unknown)}")
    previous = _overrides.get(op)
    _overrides[op] = {**(previous or {}), **values}
    _memo.clear()
    try:
        yield
    finally:
        if previous is None:
            _overrides.pop(op)
        else:
            _overrides[op] = previous
        _memo.clear()


def write_gpu_entry(op: str, gpu_name: str, values: dict) -> Path:
    """Merges values into the op's table under gpu_name (a tuning script's measured choice)."""
    path = _FOLDER / f"{op}.json"
    table = json.loads(path.read_text())
    table.setdefault("gpus", {}).setdefault(gpu_name, {}).update(values)
    path.write_text(json.dumps(table, indent=2) + "\n")
    reload()
    return path
