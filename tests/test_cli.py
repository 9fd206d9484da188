"""`anygpt-engine bench` end to end on the CPU default (tiny), as a user runs it."""

import json
import subprocess
import sys

import pytest

from anygpt_engine import bench, cli


def test_bench_reports_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--new-tokens", "6", "--prompt-len", "9", "--batch-size", "3", "--json", str(out),
                     "--no-progress", "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["model"] == "tiny" and report["batch_size"] == 3 and report["new_tokens"] == 6
    for key in ("ttft_ms", "decode_tok_s", "step_ms_p50", "step_ms_p99", "achieved_gb_s", "copy_bandwidth_gb_s"):
        assert report[key] > 0, key
        assert key in table
    assert report["step_ms_p99"] >= report["step_ms_p50"]
    assert 0 < report["fraction_of_copy_bandwidth"] < 5
    # Weights read per step: every parameter but the embedding table, plus the batch's rows of it.
    hidden = 128
    embed_bytes = 53516 * hidden * 4
    assert report["weight_bytes_per_step"] == report["parameters"] * 4 - embed_bytes + 3 * hidden * 4


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


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "anygpt_engine.cli", "bench", "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "--compare" in result.stdout


def test_bench_in_a_speech_span_reads_only_speech_rows():
    report = bench.benchmark(model="tiny", batch_size=2, prompt_len=6, new_tokens=5, device="cpu", modality="speech",
                             progress=False)
    assert report["lm_head_rows_per_token"] <= 1026  # 1024 values, <sosp>, <eosp>; full head after <eosp>
    assert report["lm_head_bytes_saved_per_token"] >= (53516 - 1026) * 128 * 4 * 0.5
