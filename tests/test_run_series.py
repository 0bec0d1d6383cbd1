"""scripts/run_series.py, the runner behind `make run`: order, summary table, stop on the first failure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

ROOT = Path(__file__).resolve().parent.parent


def _notebook(path: Path, *sources: str) -> Path:
    nbformat.write(new_notebook(cells=[new_code_cell(source) for source in sources]), path)
    return path


def _project_kernel_installed() -> bool:
    from jupyter_client.kernelspec import KernelSpecManager

    sys.path.insert(0, str(ROOT / "scripts"))
    from run_series import KERNEL

    return KERNEL in KernelSpecManager().find_kernel_specs()


@pytest.fixture(scope="module")
def series_run(tmp_path_factory):
    if not _project_kernel_installed():
        pytest.skip("the project's Jupyter kernel is not installed (run `make setup`, which installs it)")
    folder = tmp_path_factory.mktemp("series")
    record = "from helpers import record_results\nrecord_results('a_first', {'answer': 42, 'ratio': 0.123456})"
    progress = "from tqdm import tqdm\nfor _ in tqdm(range(50), desc='bar', mininterval=0, miniters=1): pass"
    first = _notebook(folder / "a_first.ipynb", record, "print('first done')", progress)
    failing = _notebook(folder / "b_failing.ipynb", "x = 1", "raise ValueError('broken on purpose')", "print('never')")
    never = _notebook(folder / "c_never.ipynb", "print('should not run')")
    out = folder / "out"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_series.py"), str(first), str(failing),
                             str(never), "--out", str(out)], capture_output=True, text=True, timeout=300)
    return result, out


def test_a_failing_notebook_stops_the_run_with_its_cell_and_error(series_run):
    result, out = series_run
    assert result.returncode == 1
    assert "b_failing.ipynb failed" in result.stderr
    assert "raise ValueError('broken on purpose')" in result.stderr and "ValueError" in result.stderr
    assert not (out / "c_never.ipynb").exists()  # the run stopped at the failure


def test_the_summary_lists_time_result_and_recorded_numbers(series_run):
    result, out = series_run
    summary = (out / "summary.md").read_text()
    assert summary == result.stdout[result.stdout.index("| notebook |"):]
    rows = {line.split("|")[1].strip(): line for line in summary.splitlines() if line.startswith("| a_") or
            line.startswith("| b_")}
    assert set(rows) == {"a_first", "b_failing"}
    assert "| pass |" in rows["a_first"] and "answer=42, ratio=0.1235" in rows["a_first"]
    assert "| FAIL |" in rows["b_failing"]
    assert json.loads((out / "results" / "a_first.json").read_text())["answer"] == 42


def test_executed_copies_keep_their_outputs(series_run):
    _, out = series_run
    executed = nbformat.read(out / "a_first.ipynb", as_version=4)
    assert executed.cells[1].outputs[0]["text"] == "first done\n"


def test_a_progress_bar_is_committed_as_one_line(series_run):
    _, out = series_run
    executed = json.loads((out / "a_first.ipynb").read_text())
    streams = [output for output in executed["cells"][2]["outputs"] if output["output_type"] == "stream"]
    text = "".join("".join(output["text"]) for output in streams)
    assert len(streams) == 1
    assert "\r" not in text
    assert [line for line in text.splitlines() if line.strip()] == [line for line in text.splitlines()
                                                                    if "50/50" in line]


def test_a_notebook_showing_a_later_model_runs_again_once_that_model_exists(tmp_path, monkeypatch, capsys):
    if not _project_kernel_installed():
        pytest.skip("the project's Jupyter kernel is not installed (run `make setup`, which installs it)")
    import run_series

    monkeypatch.setattr(run_series, "ROOT", tmp_path)
    monkeypatch.setattr(run_series, "LOOKS_AHEAD", {"a_shows": "later-model"})
    model_file = tmp_path / "checkpoints" / "later-model" / "model.safetensors"
    shows = _notebook(tmp_path / "a_shows.ipynb", f"print('model present:', {str(model_file)!r} and "
                                                   f"__import__('os').path.exists({str(model_file)!r}))")
    trains = _notebook(tmp_path / "b_trains.ipynb", f"import pathlib\np = pathlib.Path({str(model_file)!r})\n"
                                                    "p.parent.mkdir(parents=True)\np.write_bytes(b'x')")
    assert run_series.run([shows, trains], tmp_path / "out", run_series.KERNEL, write_back=True) == 0
    assert "a_shows.ipynb ran before later-model existed: running it again" in capsys.readouterr().out
    saved = nbformat.read(shows, as_version=4)
    assert saved.cells[0].outputs[0]["text"] == "model present: True\n"
    # a second run of the series finds the model from the start: nothing runs twice
    assert run_series.run([shows, trains][:1], tmp_path / "out2", run_series.KERNEL) == 0
    assert "running it again" not in capsys.readouterr().out
