"""Execute the series' notebooks in order, keep the executed copies, and summarise the results.

Usage: python scripts/run_series.py [--write-back] notebooks/part02_tokenization.ipynb [...]

Executed copies go to runs/<timestamp>/; each notebook's headline numbers (written by its last
cell through helpers.record_results) are collected into the summary table printed at the end
and saved as runs/<timestamp>/summary.md. A failing notebook stops the run and shows its cell.
With --write-back every notebook that ran through is also saved over its source, so its committed
outputs are those of this run (``make run`` does this).

Outputs are cleaned as a reader should see them: consecutive stream outputs are merged and a
progress bar's carriage-return updates collapse to their final state, one line per bar.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from datetime import datetime
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parent.parent
KERNEL = "llm-from-scratch"
# Parts 03 and 05 show the small model Part 07 trains, when it exists. On a first run of the series it does
# not yet, so they run once more at the end, and their saved outputs show the trained model.
LOOKS_AHEAD = {"part03_embeddings": "part07-novels", "part05_multihead_attention": "part07-novels"}


def _headline(results: dict) -> str:
    numbers = {key: value for key, value in results.items() if key not in {"notebook", "quick"}}
    parts = []
    for key, value in numbers.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        parts.append(f"{key}={value}")
    return ", ".join(parts)


def _table(rows: list[tuple[str, str, str, str]]) -> str:
    lines = ["| notebook | time | result | headline numbers |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {seconds} | {status} | {numbers} |" for name, seconds, status, numbers in rows]
    return "\n".join(lines)


def _as_terminal_shows(text: str) -> str:
    """What a terminal would show for ``text``: on each line, a carriage return starts the line over."""
    lines = []
    for line in text.split("\n"):
        pieces = [piece for piece in line.split("\r") if piece.strip()]  # a bar clears itself with spaces
        lines.append(pieces[-1] if pieces else "")
    return "\n".join(lines)


def clean_outputs(notebook) -> None:
    """Merge consecutive stream outputs of each cell, collapse progress-bar updates to their last state, and
    drop the execution timestamps nbclient records (noise in every diff)."""
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        cell.metadata.pop("execution", None)
        merged = []
        for output in cell.get("outputs", []):
            if (output.output_type == "stream" and merged and merged[-1].output_type == "stream"
                    and merged[-1].name == output.name):
                merged[-1].text += output.text
            else:
                merged.append(output)
        for output in merged:
            if output.output_type == "stream":
                output.text = re.sub(r"\n{3,}", "\n\n", _as_terminal_shows(output.text))
        cell.outputs = merged


def _missing_later_checkpoint(path: Path) -> bool:
    """Whether `path` shows a model a later part trains (LOOKS_AHEAD) that does not exist yet."""
    name = LOOKS_AHEAD.get(path.stem)
    return name is not None and not (ROOT / "checkpoints" / name / "model.safetensors").is_file()


def _execute(path: Path, out_dir: Path, results_dir: Path, kernel: str,
             write_back: bool) -> tuple[tuple[str, str, str, str], float, bool]:
    """Execute one notebook; save the executed copy (and over the source when asked).

    Returns its summary row, the seconds it took, and whether it failed.
    """
    print(f"-> {path.name} ...", flush=True)
    notebook = nbformat.read(path, as_version=4)
    # the kernel's own log level: ERROR hides its start-up warning about unencrypted local TCP
    client = NotebookClient(notebook, timeout=None, kernel_name=kernel,
                            resources={"metadata": {"path": str(path.parent)}},
                            extra_arguments=["--IPKernelApp.log_level=ERROR"])
    start = time.perf_counter()
    failure = None
    try:
        client.execute()
    except CellExecutionError as error:
        failure = error
    elapsed = time.perf_counter() - start
    clean_outputs(notebook)
    nbformat.write(notebook, out_dir / path.name)
    if write_back and failure is None:
        nbformat.write(notebook, path)
    result_file = results_dir / f"{path.stem}.json"
    numbers = _headline(json.loads(result_file.read_text())) if result_file.exists() else ""
    print(f"   {'FAILED' if failure else 'passed'} in {elapsed:.0f} s", flush=True)
    if failure is not None:
        print(f"\n{path.name} failed; the failing cell and its error:\n{failure}", file=sys.stderr)
    return (path.stem, f"{elapsed:.0f} s", "FAIL" if failure else "pass", numbers), elapsed, failure is not None


def run(notebooks: list[Path], out_dir: Path, kernel: str, write_back: bool = False) -> int:
    results_dir = out_dir / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    os.environ["LLM_RESULTS_DIR"] = str(results_dir)  # the kernels inherit it
    mode = "quick (LLM_QUICK=1)" if os.environ.get("LLM_QUICK") else "full size"
    print(f"executing {len(notebooks)} notebooks at {mode}; executed copies in {out_dir}", flush=True)
    rows, exit_code, total_seconds = [], 0, 0.0
    looking_ahead = [path for path in notebooks if _missing_later_checkpoint(path)]
    queue = list(notebooks)
    while queue:
        path = queue.pop(0)
        row, elapsed, failed = _execute(path, out_dir, results_dir, kernel, write_back)
        rows.append(row)
        total_seconds += elapsed
        if failed:
            exit_code = 1
            break
        if not queue:  # the series is done: once more for those that ran before the model they show existed
            queue = [path for path in looking_ahead if not _missing_later_checkpoint(path)]
            looking_ahead = []
            for again in queue:
                print(f"{again.name} ran before {LOOKS_AHEAD[again.stem]} existed: running it again", flush=True)
    summary = _table(rows) + f"\n\ntotal: {total_seconds / 60:.1f} minutes for {len(rows)} notebooks"
    (out_dir / "summary.md").write_text(summary + "\n")
    print("\n" + summary)
    return exit_code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="folder for executed copies (default runs/<timestamp>)")
    parser.add_argument("--kernel", default=KERNEL, help=f"Jupyter kernel to use (default {KERNEL})")
    parser.add_argument("--write-back", action="store_true",
                        help="save each notebook that ran through over its source (refreshes the committed outputs)")
    args = parser.parse_args()
    missing = [str(path) for path in args.notebooks if not path.is_file()]
    if missing:
        parser.error(f"no such notebook: {', '.join(missing)}")
    out_dir = args.out or ROOT / "runs" / datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    return run([path.resolve() for path in args.notebooks], out_dir, args.kernel, args.write_back)


if __name__ == "__main__":
    sys.exit(main())
