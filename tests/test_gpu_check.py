"""The GPU check script runs end to end at toy sizes, so it still works the day a GPU is lent."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_measures_every_training_path_at_toy_sizes():
    result = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--steps", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split("|")[1].strip() for row in rows] == ["pretrain", "classify", "instruct", "dpo"]
    for row in rows:
        tokens_per_second = float(row.split("|")[5].strip().replace(",", ""))
        assert tokens_per_second > 0


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_gpu_check_refuses_without_cuda_in_one_line():
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no CUDA GPU" in result.stderr
