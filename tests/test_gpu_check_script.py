"""scripts/gpu_check.sh runs every test that has a CUDA path: its pytest steps select the gpu and
gpu_path markers, and every test file that marks tests so is named by one of its modes."""

import re
import shlex
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
