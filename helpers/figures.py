"""The series' diagrams and plots, shown as cell outputs that carry a text description.

A markdown image attachment renders in JupyterLab but not on GitHub's notebook viewer nor in Colab, and a
relative file link does not render in Colab. A PNG in a code cell's output renders in all three, and is saved
with the notebook, so ``show_diagram("part07_training_loop")`` is how a notebook draws a diagram. The text
description (what a screen reader or a text-only viewer shows) is kept with the figures, in
``notebooks/figures/descriptions.json``. Plots go through ``show_plot(fig, description)`` for the same reason.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
from IPython.display import display
from matplotlib.figure import Figure

FIGURES = Path(__file__).resolve().parent.parent / "notebooks" / "figures"
DESCRIPTIONS = FIGURES / "descriptions.json"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Diagram:
    """One rendered diagram: Jupyter shows its PNG; ``repr`` gives its text description."""

    name: str
    png: bytes
    description: str

    def _repr_png_(self) -> tuple[bytes, dict[str, int]]:
        # rendered at 2x for sharp high-density screens: shown at half its pixel width, as IPython's retina=True
        width = int.from_bytes(self.png[16:20], "big")  # the PNG header's width field
        return self.png, {"width": width // 2}

    def __repr__(self) -> str:
        return f"Diagram {self.name}: {self.description}"


def diagram_descriptions(figures: Path = FIGURES) -> dict[str, str]:
    """Every diagram's text description, by name (the PNG's file name without ``.png``)."""
    path = figures / DESCRIPTIONS.name
    try:
        descriptions = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: the diagrams need a checkout of the whole project "
                                "(git clone), not only the helpers package") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}): restore it with git checkout") from None
    if not isinstance(descriptions, dict) or not all(isinstance(v, str) and v.strip()
                                                     for v in descriptions.values()):
        raise ValueError(f"{path} must map each diagram's name to a non-empty description")
    return descriptions


def show_diagram(name: str, figures: Path = FIGURES) -> Diagram:
    """The diagram ``notebooks/figures/<name>.png`` with its description; a cell that ends with it shows it."""
    if not isinstance(name, str) or not name or Path(name).name != name or name.endswith(".png"):
        raise ValueError(f"diagram name must be a file name without '.png', like 'part07_training_loop', "
                         f"got {name!r}")
    descriptions = diagram_descriptions(figures)
    if name not in descriptions:
        known = ", ".join(sorted(descriptions))
        raise KeyError(f"no diagram named {name!r}; the known ones: {known}")
    path = figures / f"{name}.png"
    try:
        png = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: render it with python scripts/render_figures.py") from None
    if not png.startswith(_PNG_SIGNATURE):
        raise ValueError(f"{path} is not a PNG file: render it again with python scripts/render_figures.py")
    return Diagram(name, png, descriptions[name])


@dataclass(frozen=True)
class Plot:
    """A matplotlib figure rendered to PNG, with the text a screen reader or a text-only viewer shows."""

    png: bytes
    description: str

    def _repr_png_(self) -> bytes:
        return self.png

    def __repr__(self) -> str:
        return f"Plot: {self.description}"


def render_plot(fig: Figure, description: str) -> Plot:
    """``fig`` as a PNG with its text description (one sentence saying what it shows); closes the figure."""
    if not isinstance(fig, Figure):
        raise TypeError(f"render_plot needs a matplotlib Figure (fig or ax.figure), got {type(fig).__name__}")
    if not isinstance(description, str) or not description.strip():
        raise ValueError("a plot needs a description: one sentence saying what it shows")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")  # what the inline backend does, at the figure's dpi
    plt.close(fig)  # else Jupyter's inline backend shows it a second time
    return Plot(buffer.getvalue(), " ".join(description.split()))


def show_plot(fig: Figure, description: str) -> None:
    """Where a notebook would call ``plt.show()``: show ``fig`` with ``description`` as its text version.

    The saved output then holds the PNG and the description, where a plain ``plt.show()`` saves
    "<Figure size 640x480 with 1 Axes>" as the text. Outside Jupyter the description is printed.
    """
    display(render_plot(fig, description))
