"""Rehearse the notebooks' online branches as a Colab user would take them, against a stand-in hub.

Usage: python scripts/rehearse_online.py [--sizes quick|true] [--keep DIR] [notebook ...]

Each notebook (default: Part 08 and the three Part 09 notebooks) runs end to end with
``LLM_ONLINE=1`` and ``LLM_QUICK=1``, ``HF_ENDPOINT`` pointing at scripts/stand_in_hub.py on
127.0.0.1, ``HF_HUB_OFFLINE`` unset and an empty Hugging Face cache, in a scratch copy of the project
(``helpers/``, the notebooks, ``pyproject.toml``), so the checkpoints and results it writes never mix
with the real ones. Part 07's checkpoints are copied in when they exist (otherwise the notebooks train
their stand-ins, as on Colab). The preferences notebook runs before the instruction notebook: it
starts, as on Colab, without an instruction model and builds its own.

``--sizes quick`` (``make test-online``) serves small random models; ``--sizes true`` (``make
rehearse-full``) serves random weights of GPT-2 124M's and 355M's true shapes, written once under
runs/stand-in-hub/. A notebook passes when it runs to the end and printed its online branch line.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from stand_in_hub import start_hub, write_repos  # noqa: E402

NOTEBOOKS = ["part08_pretrained_weights", "part09_finetuning_classification", "part09_finetuning_preferences",
             "part09_finetuning_instructions"]
PART07_CHECKPOINTS = ["part07-quick", "part07-novels-quick"]  # what the online branches may read, quick sizes


def make_workspace(folder: Path, notebooks: list[str]) -> Path:
    """A scratch copy of the project: the package, the notebooks to run, and Part 07's quick checkpoints."""
    shutil.copytree(ROOT / "helpers", folder / "helpers", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "pyproject.toml", folder / "pyproject.toml")
    (folder / "notebooks").mkdir()
    for name in notebooks:
        shutil.copy2(ROOT / "notebooks" / f"{name}.ipynb", folder / "notebooks" / f"{name}.ipynb")
    for name in PART07_CHECKPOINTS:
        if (ROOT / "checkpoints" / name).is_dir():
            shutil.copytree(ROOT / "checkpoints" / name, folder / "checkpoints" / name)
    return folder


def kernel_environment(workspace: Path, endpoint: str) -> dict[str, str]:
    """What the notebooks' kernels see: the online switch, the stand-in hub, an empty cache, quick sizes."""
    env = {key: value for key, value in os.environ.items() if key not in {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"}}
    env.update(LLM_ONLINE="1", LLM_QUICK="1", HF_ENDPOINT=endpoint, HF_HOME=str(workspace / "hf-home"),
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(workspace), LLM_DATA_DIR=str(workspace / "data"),
               LLM_RESULTS_DIR=str(workspace / "results"), MPLBACKEND="Agg")
    return env


def branch_lines(notebook) -> list[str]:
    """The lines the notebook printed that name its branch (ONLINE (...) or OFFLINE (...))."""
    found = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            text = output.get("text", "") if output.get("output_type") == "stream" else ""
            found += [line for line in text.splitlines() if line.startswith(("ONLINE (", "OFFLINE ("))]
    return found


def run_notebook(path: Path) -> tuple[bool, str, float]:
    """Execute one notebook in place; (passed, what to report, seconds)."""
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=None, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}},
                            extra_arguments=["--IPKernelApp.log_level=ERROR"])
    started = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as error:
        nbformat.write(notebook, path)
        last_lines = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip().splitlines()[-12:]  # the error, no colours
        return False, "a cell failed:\n" + "\n".join(last_lines), time.perf_counter() - started
    nbformat.write(notebook, path)
    lines = branch_lines(notebook)
    seconds = time.perf_counter() - started
    if not lines or not all(line.startswith("ONLINE (LLM_ONLINE=1)") for line in lines):
        return False, f"ran, but did not take the online branch: {lines or 'no branch line printed'}", seconds
    return True, lines[0], seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", default=NOTEBOOKS, help="notebook names (default: the four)")
    parser.add_argument("--sizes", choices=["quick", "true"], default="quick", help="the stand-in models' shapes")
    parser.add_argument("--keep", type=Path, help="execute in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    names = [Path(name).stem for name in args.notebooks]
    repos = write_repos(ROOT / "runs" / "stand-in-hub" / args.sizes, args.sizes)
    hub = start_hub(repos)
    scratch = None if args.keep else tempfile.TemporaryDirectory(prefix="rehearse-online-")
    workspace = args.keep or Path(scratch.name)
    if args.keep:
        shutil.rmtree(workspace, ignore_errors=True)
        workspace.mkdir(parents=True)
    make_workspace(workspace, names)
    saved_env, kernel_env = dict(os.environ), kernel_environment(workspace, hub.endpoint)
    os.environ.clear()
    os.environ.update(kernel_env)  # the kernels inherit this process's environment
    print(f"rehearsing {len(names)} online branches against the stand-in hub at {hub.endpoint} ({args.sizes} shapes, "
          f"quick sizes, empty cache)", flush=True)
    failures, total = 0, 0.0
    try:
        for name in names:
            passed, report, seconds = run_notebook(workspace / "notebooks" / f"{name}.ipynb")
            total += seconds
            print(f"  {'passed' if passed else 'FAILED'} {name} in {seconds:.0f} s: {report}", flush=True)
            failures += not passed
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        hub.shutdown()
        if scratch is not None:
            scratch.cleanup()
    print(f"online rehearsal: {len(names) - failures} of {len(names)} passed in {total / 60:.1f} minutes "
          f"({sum('/resolve/' in r for r in hub.requests)} file requests to the stand-in hub)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
