"""Tuning tables: GPU entries by specificity, overrides for sweeps, and measured entries written back."""

import json

import pytest
import torch

from anygpt_engine import tuning


@pytest.fixture
def table_folder(tmp_path, monkeypatch):
    (tmp_path / "op.json").write_text(json.dumps({
        "default": {"block": 64, "warps": 4},
        "gpus": {"NVIDIA H100 80GB HBM3": {"block": 256}, "H100": {"block": 128, "warps": 8}},
    }))
    monkeypatch.setattr(tuning, "_FOLDER", tmp_path)
    monkeypatch.setattr(tuning, "_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    tuning.reload()
    yield tmp_path
    tuning.reload()


def test_more_specific_gpu_entry_wins_whatever_the_file_order(table_folder):
    assert tuning.params("op", torch.device("cpu")) == {"block": 256, "warps": 8}


def test_override_applies_inside_the_block_only_and_nests(table_folder):
    dev = torch.device("cpu")
    assert tuning.params("op", dev) == {"block": 256, "warps": 8}  # memoised before the override
    with tuning.override("op", warps=2):
        assert tuning.params("op", dev) == {"block": 256, "warps": 2}
        with tuning.override("op", block=32):
            assert tuning.params("op", dev) == {"block": 32, "warps": 2}
        assert tuning.params("op", dev) == {"block": 256, "warps": 2}
    assert tuning.params("op", dev) == {"block": 256, "warps": 8}


def test_params_are_memoised_read_only_and_equal_the_merged_table(monkeypatch):
    """The memo returns what merging the table gives (params_for), the same mapping each call,
    for the CPU and for a GPU name with entries, and callers cannot change it."""
    tuning.reload()
    names = {torch.device("cpu"): "cpu", torch.device("cuda", 5): "NVIDIA H100 80GB HBM3"}
    monkeypatch.setattr(tuning, "_device_name", names.__getitem__)
    try:
        for path in sorted(tuning._FOLDER.glob("*.json")):
            for device, name in names.items():
                first = tuning.params(path.stem, device)
                assert first == tuning.params_for(path.stem, name), (path.stem, name)
                assert tuning.params(path.stem, device) is first
                with pytest.raises(TypeError):
                    first["anything"] = 1
    finally:
        tuning.reload()


def test_reload_reads_a_changed_file(table_folder):
    dev = torch.device("cpu")
    assert tuning.params("op", dev)["warps"] == 8
    (table_folder / "op.json").write_text(json.dumps({"default": {"block": 64, "warps": 2}}))
    assert tuning.params("op", dev)["warps"] == 8  # read once
    tuning.reload()
    assert tuning.params("op", dev) == {"block": 64, "warps": 2}


def test_override_rejects_unknown_parameters(table_folder):
    with pytest.raises(KeyError, match="blok"):
        with tuning.override("op", blok=1):
            pass


def test_write_gpu_entry_merges_and_is_read_back(table_folder):
    tuning.params("op", torch.device("cpu"))  # cached before the write
    tuning.write_gpu_entry("op", "NVIDIA H100 80GB HBM3", {"warps": 16})
    assert tuning.params("op", torch.device("cpu")) == {"block": 256, "warps": 16}
    written = json.loads((table_folder / "op.json").read_text())
    assert written["gpus"]["H100"] == {"block": 128, "warps": 8}


def test_shipped_tables_parse_and_cpu_entries_only_refine_defaults():
    for path in sorted(tuning._FOLDER.glob("*.json")):
        table = json.loads(path.read_text())
        for key, entry in table.get("gpus", {}).items():
            assert set(entry) <= set(table["default"]) | {"decode_rules"}, (path.name, key)
