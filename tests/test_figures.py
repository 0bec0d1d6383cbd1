"""The diagrams: images in the notebooks' markdown (relative links render on GitHub and in JupyterLab, offline
too); the plots: cell outputs that carry a text description."""

import json
import re
from pathlib import Path

import pytest

FIGURES = Path(__file__).resolve().parent.parent / "notebooks" / "figures"
NOTEBOOKS = sorted(FIGURES.parent.glob("part*.ipynb"))
IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)]+)\)")


def test_every_diagram_is_rendered_and_shown_in_the_prose_with_a_description():
    svgs = {p.stem for p in FIGURES.glob("*.svg")}
    pngs = {p.stem for p in FIGURES.glob("*.png")}
    assert svgs == pngs
    shown = set()
    for path in NOTEBOOKS:
        notebook = json.loads(path.read_text(encoding="utf-8"))
        for cell in notebook["cells"]:
            source = "".join(cell["source"])
            assert "attachment:" not in source and "attachments" not in cell, f"{path.name}: an attachment image"
            for alt, link in IMAGE.findall(source):
                if link.startswith("https://colab.research.google.com"):
                    continue  # the Colab badge
                assert cell["cell_type"] == "markdown"
                assert link.startswith("figures/") and link.endswith(".png"), f"{path.name}: {link}"
                assert (FIGURES.parent / link).is_file(), f"{path.name}: {link} does not exist"
                assert len(alt.split()) >= 10, f"{path.name}: {link} needs a description as its alt text"
                shown.add(Path(link).stem)
    assert shown == pngs


def test_show_plot_saves_the_png_with_its_description_and_closes_the_figure(capsys):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from helpers.figures import Plot, render_plot, show_plot

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    plot = render_plot(fig, "A falling  line,\n from 1 to 0")
    assert isinstance(plot, Plot) and plot.png.startswith(b"\x89PNG")
    assert plot.description == "A falling line, from 1 to 0"
    assert not plt.fignum_exists(fig.number)
    fig, _ = plt.subplots()
    show_plot(fig, "an empty plot")  # outside Jupyter the description is printed
    assert "an empty plot" in capsys.readouterr().out
    with pytest.raises(ValueError, match="description"):
        render_plot(plt.figure(), "  ")
    with pytest.raises(TypeError, match="ax.figure"):
        render_plot(ax, "the axes, not the figure")


def test_every_committed_plot_carries_a_description():
    for path in NOTEBOOKS:
        notebook = json.loads(path.read_text(encoding="utf-8"))
        for index, cell in enumerate(notebook["cells"]):
            for output in cell.get("outputs", []):
                data = output.get("data", {})
                if "image/png" in data:
                    text = "".join(data.get("text/plain", ""))
                    assert text.startswith("Plot: "), f"{path.name} cell {index}: {text[:60]!r}"


def test_nbconvert_html_shows_the_diagram_from_the_prose():
    """What JupyterLab's HTML export shows: the markdown image, linked relatively, with its description."""
    import nbformat
    from nbconvert import HTMLExporter

    path = FIGURES.parent / "part04_attention.ipynb"
    html, _ = HTMLExporter().from_notebook_node(nbformat.read(path, as_version=4))
    assert re.search(r'<img alt="The data flow of causal self-attention[^"]*" src="figures/part04_attention.png"', html)
