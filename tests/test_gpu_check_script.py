"""scripts/gpu_check.sh runs every test that has a CUDA path: its pytest steps select the gpu and
gpu_path markers, and every test file that marks tests so is named by one of its modes."""

import os
import re
import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_every_test_with_a_cuda_path():
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    [definition] = re.findall(r"^pytest_gpu=\((.*)\)$", script, flags=re.M)
    words = shlex.split(definition)  # python -m pytest ... -m EXPRESSION
    assert words[len(words) - words[::-1].index("-m")] == "gpu or gpu_path"
    steps = [line for line in script.replace("\\\n", " ").splitlines() if '"${pytest_gpu[@]}"' in line]
    named = {name for line in steps for name in re.findall(r"tests/test_\w+\.py", line)}
    marked = {f"tests/{path.name}" for path in (ROOT / "tests").glob("test_*.py")
              if re.search(r"pytest\.mark\.gpu(_path)?\b", path.read_text()) and path.name != Path(__file__).name}
    assert {"tests/test_attention.py", "tests/test_lm_head.py", "tests/test_rvq.py"} <= marked
    assert marked <= named, f"files with gpu or gpu_path tests that no gpu_check.sh mode runs: {marked - named}"


def test_steps_share_one_budget_and_skip_when_it_is_spent(tmp_path):
    """The device tool stops a call at 600 s and a stopped script writes no summary: each step's
    limit is cut to what is left of GPU_CHECK_BUDGET_S, and a step with under 5 s left is skipped."""
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    [budget] = re.findall(r"^budget=.*$", script, flags=re.M)
    [step] = re.findall(r"^step\(\) \{.*?^\}$", script, flags=re.M | re.S)
    body = "\n".join([f"out={shlex.quote(str(tmp_path))}", "status=0", budget, step,
                      "step first 100 sleep 2", "step second 100 sleep 30", "step third 100 true", "echo status=$status"])
    result = subprocess.run(["bash", "-c", body], env={**os.environ, "GPU_CHECK_BUDGET_S": "9"}, capture_output=True,
                            text=True, timeout=60)
    steps = (tmp_path / "steps.txt").read_text().splitlines()
    assert steps[0].startswith("first rc=0 ")
    assert re.fullmatch(r"second rc=124 [5-8]s", steps[1]), steps  # its 100 s cut to the ~7 s left
    assert steps[2] == "third skipped: the 9s budget is spent"
    assert result.stdout.strip().endswith("status=1")
