"""The benchmarks' tuning sweeps: they run, keep only configurations with identical results,
and record the fastest for the GPU (here on the CPU with tiny shapes and a scratch table)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from anygpt_engine import tuning

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def scratch_tables(tmp_path, monkeypatch):
    for op in ("rvq", "attention"):
        (tmp_path / f"{op}.json").write_text((tuning._FOLDER / f"{op}.json").read_text())
    monkeypatch.setattr(tuning, "_FOLDER", tmp_path)
    tuning.reload()
    yield tmp_path
    tuning.reload()


@pytest.mark.parametrize("fastest_tile,fastest_block", [(32, 16), (16, 32)])
def test_rvq_sweep_checks_codes_and_records_the_fastest(scratch_tables, monkeypatch, fastest_tile, fastest_block):
    """The sweep runs every candidate (its codes and decodes must be identical) and records the
    fastest. Timings come from a table keyed by the candidate being timed (read from the tuning
    override the sweep has active), so which one is fastest is known; both orders are tried."""
    bench = _load("bench_rvq")
    monkeypatch.setitem(bench.SHAPES, "speechtokenizer 8x1024x1024", (2, 40, 16))
    monkeypatch.setattr(bench, "ENCODE_TILES", [(16, 32, 16, 4, 4, 2, False), (32, 64, 16, 8, 4, 2, True)])
    monkeypatch.setattr(bench, "DECODE_BLOCKS", (16, 32))
    shipped_block_m = tuning.params("rvq", torch.device("cpu"))["triton_block_m"]

    def timed(fn, reps):
        p = tuning.params("rvq", torch.device("cpu"))
        if p["triton_block_m"] == shipped_block_m:  # a decode candidate
            return 0.5 if p["decode_block_d"] == fastest_block else 2.0
        return 1.0 if p["triton_block_m"] == fastest_tile else 3.0

    monkeypatch.setattr(bench, "timed", timed)
    rows, values = bench.sweep(23, 1, torch.device("cpu"))
    assert [r["face"].split()[0] for r in rows] == ["triton"] * 4
    assert all(r["identical"] for r in rows)
    assert sorted(r["ms"] for r in rows) == [0.5, 1.0, 2.0, 3.0]
    assert values["encode_faces"] == ["triton"] and values["decode_faces"] == ["triton"]
    assert (values["triton_block_m"], values["decode_block_d"]) == (fastest_tile, fastest_block)
    tuning.write_gpu_entry("rvq", "Test GPU", values)
    assert json.loads((scratch_tables / "rvq.json").read_text())["gpus"]["Test GPU"] == values


def test_attention_tuning_takes_fastest_correct_tile_and_decode_faces(scratch_tables):
    bench = _load("bench_attention")

    def tile(ms, shape, err, path="packed", tma=False):
        return dict(kind="prefill_tile", median_ms=ms, tile=shape, rel_diff_vs_default=err, path=path, tma=tma)

    rows = [
        tile(1.0, [128, 64, 8, 3], 0.0),
        tile(0.5, [64, 64, 4, 3], math.inf, tma=True),  # wrong, however fast
        tile(0.2, [64, 64, 4, 3], 0.0, "paged"),  # paged timings inform, packed ones choose
        tile(0.8, [128, 128, 8, 2], 1e-3),
        tile(0.6, [128, 128, 8, 2], 1e-3, tma=True),
        dict(kind="decode", impl="engine_cuda", batch=1, context=512, median_ms=0.02),
        dict(kind="decode", impl="engine_triton", batch=1, context=512, median_ms=0.03),
        dict(kind="decode", impl="sdpa_contiguous", batch=1, context=512, median_ms=0.01),
        dict(kind="decode", impl="engine_triton", batch=32, context=4096, median_ms=1.0),
        dict(kind="decode", impl="engine_cuda", batch=32, context=4096, median_ms=1.1),
    ]
    bench.write_tuning(rows, "Test GPU")
    entry = json.loads((scratch_tables / "attention.json").read_text())["gpus"]["Test GPU"]
    assert entry == dict(prefill_block_m=128, prefill_block_n=128, prefill_warps=8, prefill_stages=2, prefill_tma=True,
                         decode_rules=[[1, 512, "cuda"], [32, 4096, "triton"]])
