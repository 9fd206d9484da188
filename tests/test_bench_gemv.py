"""benchmarks/bench_gemv.py on the CPU with tiny shapes: the table checks every row against the
reference, and the tuning sweep keeps only matching candidates and records the fastest."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from anygpt_engine import tuning

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(tmp_path, monkeypatch):
    (tmp_path / "gemv.json").write_text((tuning._FOLDER / "gemv.json").read_text())
    monkeypatch.setattr(tuning, "_FOLDER", tmp_path)
    tuning.reload()
    spec = importlib.util.spec_from_file_location("bench_gemv", ROOT / "benchmarks" / "bench_gemv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    tuning.reload()


SHAPES = {"w13": (256, 128, "silu_mul"), "w2": (64, 128, "residual")}


def test_table_rows_match_the_reference(bench):
    rows = bench.table(SHAPES, (1, 5), (None, "int4"), torch.device("cpu"), torch.float32, 1, 1e9)
    assert len(rows) == 8 and {r["weights"] for r in rows} == {"fp32", "int4"}
    assert all(r["rel_error"] < 1e-5 and r["gb_s"] > 0 for r in rows)


def test_sweep_records_the_fastest_matching_candidates(bench, monkeypatch):
    monkeypatch.setattr(bench, "FMA_TILES", [dict(fma_block_n=16, fma_elements=4096),
                                             dict(fma_block_n=64, fma_elements=65536)])
    monkeypatch.setattr(bench, "DOT_TILES", [dict(dot_block_n=16, dot_block_k=64)])
    monkeypatch.setattr(bench, "CROSSOVER_MS", (16,))
    monkeypatch.setattr(bench, "SPLIT_RULES", [dict(split_waves=0), dict(split_waves=2, split_min_k=32)])
    monkeypatch.setattr(bench, "SPLIT_COUNTS", (1, 2))
    monkeypatch.setattr(bench, "SPLIT_MS", (1,))
    rows, values = bench.sweep({"w2": SHAPES["w2"]}, torch.device("cpu"), torch.float32, 1)
    assert values["fma_block_n"] in (16, 64) and values["dot_block_n"] == 16
    assert values["dot_min_m"] in (2, 4, 8, 16, 17) and 0 <= values["max_m"] <= 16
    assert values["split_waves"] in (0, 2) and values["split_k"]["linear 64x128"]["1"] in (1, 2)
    assert {r["kind"] for r in rows} >= {"fma_tile", "dot_tile", "dot_min_m", "split_rule", "split_k", "crossover"}
    tuning.write_gpu_entry("gemv", "Test GPU", values)
    assert json.loads((tuning._FOLDER / "gemv.json").read_text())["gpus"]["Test GPU"] == values
