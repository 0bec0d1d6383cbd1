"""Embed the series' diagrams into the notebooks as markdown attachments.

Usage: python scripts/embed_figures.py [NOTEBOOK.ipynb ...]   (default: every notebooks/part*.ipynb)

A markdown cell shows a diagram with ``![alt text](attachment:part07_training_loop.png)``. This script
copies the current ``notebooks/figures/part07_training_loop.png`` into that cell's attachments, so the
picture travels inside the notebook and renders in JupyterLab, on GitHub and in Colab alike (a relative
file link would not render in Colab). Edit the SVG source, run ``scripts/render_figures.py``, then this.
Attachments no cell refers to any more are dropped. Outputs and other cells are left untouched.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from helpers.runtime import write_atomically  # noqa: E402  (after the path set-up above)

FIGURES = ROOT / "notebooks" / "figures"
ATTACHMENT = re.compile(r"\(attachment:([\w.-]+\.png)\)")


def embed(notebook_path: Path) -> list[str]:
    """Refresh the attachments of every markdown cell of one notebook; return the figure names embedded."""
    notebook = json.loads(notebook_path.read_text(encoding="utf-8"))
    embedded = []
    for cell in notebook["cells"]:
        if cell["cell_type"] != "markdown":
            continue
        names = ATTACHMENT.findall("".join(cell["source"]))
        if not names:
            cell.pop("attachments", None)
            continue
        attachments = {}
        for name in names:
            figure = FIGURES / name
            if not figure.is_file():
                raise SystemExit(f"{notebook_path.name}: {figure.relative_to(ROOT)} does not exist "
                                 "(render it with scripts/render_figures.py)")
            attachments[name] = {"image/png": base64.b64encode(figure.read_bytes()).decode("ascii")}
            embedded.append(name)
        cell["attachments"] = attachments
    text = json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"
    write_atomically(notebook_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return embedded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path)
    args = parser.parse_args(argv)
    notebooks = args.notebooks or sorted((ROOT / "notebooks").glob("part*.ipynb"))
    for path in notebooks:
        names = embed(path)
        print(f"{path.name}: {', '.join(names) if names else 'no figures'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
