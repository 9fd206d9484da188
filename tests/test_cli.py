"""`anygpt-engine bench` end to end on the CPU default (tiny), as a user runs it."""

import importlib.metadata
import json
import shutil
import statistics
import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from anygpt_engine import bench, cli
from anygpt_engine.ops._extension import cuda_kernels_built


def test_bench_reports_and_writes_json(tmp_path, capsys, monkeypatch):
    runs = []  # what the timed run measured, to check the report's statistics against

    def recorded(*args, **kwargs):
        runs.append(run_engine(*args, **kwargs))
        return runs[-1]

    run_engine = bench.run_engine
    monkeypatch.setattr(bench, "run_engine", recorded)
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--new-tokens", "6", "--prompt-len", "9", "--batch-size", "3", "--json", str(out),
                     "--no-progress", "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["model"] == "tiny" and report["batch_size"] == 3 and report["new_tokens"] == 6
    for key in ("ttft_ms", "decode_tok_s", "step_ms_p50", "step_ms_p99", "achieved_gb_s", "copy_bandwidth_gb_s"):
        assert report[key] > 0, key
        assert key in table
    timed = runs[-1]  # after the warm-up run
    steps = timed["step_s"]
    assert len(steps) == 5 and [len(o) for o in timed["outputs"]] == [6] * 3  # the first token is not a step
    assert report["ttft_ms"] == pytest.approx(timed["ttft_s"] * 1e3)
    assert report["step_ms_p50"] == pytest.approx(statistics.median(steps) * 1e3)
    assert report["step_ms_p99"] == pytest.approx(max(steps) * 1e3)  # nearest rank of 5 steps: the slowest
    assert report["decode_tok_s"] == pytest.approx(3 * 5 / sum(steps))
    assert 0 < report["fraction_of_copy_bandwidth"] < 5
    # Weights read per step: every parameter but the embedding table, plus the batch's rows of it.
    hidden = 128
    embed_bytes = 53516 * hidden * 4
    assert report["weight_bytes_per_step"] == report["parameters"] * 4 - embed_bytes + 3 * hidden * 4
    # On a CPU every op takes its torch reference face; the report and the table say so.
    assert set(report["faces"]) >= {"linear", "varlen_attention", "paged_decode_attention", "lm_head", "sample_tokens"}
    assert all(faces == ["torch"] for faces in report["faces"].values()), report["faces"]
    assert "face sample_tokens" in table
    assert report["cuda_kernels_built"] == cuda_kernels_built()


def test_bench_faces_are_those_of_the_timed_engine(monkeypatch):
    """A face forced for one op shows in the report; the reference engine run afterwards (every op
    on torch) is not part of it."""
    monkeypatch.setenv("ANYGPT_BACKEND", "lm_head=triton")
    report = bench.benchmark(model="tiny", batch_size=1, prompt_len=5, new_tokens=3, device="cpu",
                             compare="reference", progress=False)
    assert report["faces"].pop("lm_head") == ["triton"]
    assert report["faces"] and all(faces == ["torch"] for faces in report["faces"].values()), report["faces"]


def test_bench_compare_hf(capsys):
    pytest.importorskip("transformers")
    report = bench.benchmark(model="tiny", batch_size=2, prompt_len=5, new_tokens=8, device="cpu",
                             compare=["hf", "reference"], progress=False)
    assert report["hf_end_to_end_tok_s"] > 0 and report["speedup_vs_hf"] > 0
    assert report["reference_decode_tok_s"] > 0 and report["speedup_vs_reference"] > 0
    # Same weights, same greedy decoding, float32: the tokens agree.
    assert report["greedy_tokens_equal_to_hf"] == 1.0
    assert report["greedy_tokens_equal_to_reference"] == 1.0


def test_bench_rejects_bad_options(capsys):
    assert cli.main(["bench", "--new-tokens", "1", "--device", "cpu", "--no-progress"]) == 2
    assert "new_tokens=1" in capsys.readouterr().err


@pytest.mark.parametrize("q", [0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("n", [1, 2, 7, 100, 201])
def test_percentile_is_the_nearest_rank(q, n):
    values = list(np.random.default_rng(n).permutation(n) * 0.5 + 1.0)
    assert bench._percentile(values, q) == np.percentile(values, q * 100, method="nearest")


def test_console_script_is_installed():
    """The `anygpt-engine` command itself (the console-script entry point pip installs), not
    `python -m anygpt_engine.cli`."""
    [entry] = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "anygpt-engine"]
    assert entry.value == "anygpt_engine.cli:main" and entry.load() is cli.main
    script = Path(sysconfig.get_path("scripts")) / "anygpt-engine"
    script = str(script) if script.exists() else shutil.which("anygpt-engine")
    assert script, "the anygpt-engine command is not installed (pip install -e .)"
    result = subprocess.run([script, "bench", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--compare" in result.stdout, result.stderr


def test_bench_in_a_speech_span_reads_only_speech_rows():
    report = bench.benchmark(model="tiny", batch_size=2, prompt_len=6, new_tokens=5, device="cpu", modality="speech",
                             progress=False)
    assert report["lm_head_rows_per_token"] <= 1026  # 1024 values, <sosp>, <eosp>; full head after <eosp>
    assert report["lm_head_bytes_saved_per_token"] >= (53516 - 1026) * 128 * 4 * 0.5
