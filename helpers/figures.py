"""Plots shown as cell outputs that carry a text description.

A plain ``plt.show()`` saves "<Figure size 640x480 with 1 Axes>" as the text version of a plot, which is
what a screen reader or a text-only viewer gets. ``show_plot(fig, description)`` saves a sentence saying
what the plot shows instead. (The series' diagrams are images in the notebooks' markdown, linked
relatively from ``notebooks/figures/``, which GitHub, JupyterLab and nbconvert all render.)
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import matplotlib.pyplot as plt
from IPython.display import display
from matplotlib.figure import Figure


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
