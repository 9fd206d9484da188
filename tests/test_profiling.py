"""NVTX ranges: named as documented when on, absent and harmless when off."""

import sys
import types

import pytest
import torch

from anygpt_engine import Engine, SamplingParams, profiling


@pytest.fixture
def recorded(monkeypatch):
    names = []
    monkeypatch.setattr(profiling, "_push", names.append)
    monkeypatch.setattr(profiling, "_pop", lambda: names.append(None))
    monkeypatch.setattr(profiling, "_enabled", True)
    return names


def test_ranges_cover_steps_and_ops(recorded):
    engine = Engine("tiny", device="cpu")
    engine.generate([[1, 2, 3]], SamplingParams.greedy(3))
    opened = [n for n in recorded if n is not None]
    assert len(opened) == recorded.count(None)  # balanced
    for name in ("anygpt/step", "anygpt/prefill", "anygpt/decode_step", "anygpt/sample", "anygpt/op/embedding",
                 "anygpt/op/attention", "anygpt/op/mlp", "anygpt/op/lm_head"):
        assert name in opened, name


def test_off_by_default_and_harmless_without_a_profiler(monkeypatch):
    calls = []
    monkeypatch.setattr(profiling, "_push", calls.append)
    monkeypatch.setattr(profiling, "_enabled", False)
    with profiling.nvtx_range("anygpt/step"):
        pass
    assert calls == []


def test_enable_reports_whether_an_nvtx_implementation_exists(monkeypatch):
    """enable(True) is on exactly when the nvtx package or a CUDA device provides ranges: without
    either it reports off and ranges stay no-ops; with one, ranges reach it."""
    for name in ("_enabled", "_push", "_pop"):  # enable() rebinds these; restored afterwards
        monkeypatch.setattr(profiling, name, getattr(profiling, name))
    monkeypatch.setitem(sys.modules, "nvtx", None)  # `import nvtx` raises ImportError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert profiling.enable(True) is False and profiling.enabled() is False
    assert profiling.nvtx_range("anygpt/step") is profiling.nvtx_range("anygpt/prefill")  # the shared no-op

    calls = []
    monkeypatch.setitem(sys.modules, "nvtx", types.SimpleNamespace(push_range=calls.append,
                                                                   pop_range=lambda: calls.append(None)))
    assert profiling.enable(True) is True and profiling.enabled() is True
    with profiling.nvtx_range("anygpt/step"):
        calls.append("inside")
    assert calls == ["anygpt/step", "inside", None]
    assert profiling.enable(False) is False and profiling.enabled() is False


def test_profile_command_runs(capsys):
    from anygpt_engine import cli

    assert cli.main(["profile", "--device", "cpu", "--batch-size", "2", "--prompt-len", "8", "--new-tokens", "4"]) == 0
    assert "profiled Engine(tiny" in capsys.readouterr().out
