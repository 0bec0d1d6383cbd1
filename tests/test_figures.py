"""The diagrams: shown as cell outputs (which render on GitHub, in Colab and in JupyterLab), each described."""

import json
import re
from pathlib import Path

import pytest

from helpers.figures import FIGURES, Diagram, diagram_descriptions, show_diagram

NOTEBOOKS = sorted((FIGURES.parent).glob("part*.ipynb"))
CALL = re.compile(r'show_diagram\("([\w-]+)"\)')


def test_every_figure_is_rendered_and_described():
    svgs = {p.stem for p in FIGURES.glob("*.svg")}
    pngs = {p.stem for p in FIGURES.glob("*.png")}
    assert svgs == pngs == set(diagram_descriptions())


def test_notebooks_show_every_diagram_as_an_output_never_as_an_attachment():
    shown = set()
    for path in NOTEBOOKS:
        notebook = json.loads(path.read_text(encoding="utf-8"))
        for cell in notebook["cells"]:
            source = "".join(cell["source"])
            assert "attachment:" not in source and "attachments" not in cell, f"{path.name}: an attachment image"
            if cell["cell_type"] == "code":
                for name in CALL.findall(source):
                    shown.add(name)
                    images = [o["data"]["image/png"] for o in cell["outputs"] if "image/png" in o.get("data", {})]
                    assert images, f"{path.name}: the diagram {name} is not in the committed outputs"
    assert shown == set(diagram_descriptions())


def test_show_diagram_gives_the_png_and_its_description():
    diagram = show_diagram("part07_training_loop")
    assert isinstance(diagram, Diagram)
    png, metadata = diagram._repr_png_()
    assert png == (FIGURES / "part07_training_loop.png").read_bytes()
    assert metadata["width"] * 2 in (int.from_bytes(png[16:20], "big"), int.from_bytes(png[16:20], "big") - 1)
    assert "train_simple" in repr(diagram)


@pytest.mark.parametrize("name", ["", "part07_training_loop.png", "../figures/part07_training_loop", 7])
def test_show_diagram_refuses_a_bad_name(name):
    with pytest.raises(ValueError, match="diagram name"):
        show_diagram(name)


def test_show_diagram_names_the_known_ones_and_the_missing_file(tmp_path: Path):
    with pytest.raises(KeyError, match="part07_training_loop"):
        show_diagram("part99_nothing")
    (tmp_path / "descriptions.json").write_text(json.dumps({"x": "a box"}))
    with pytest.raises(FileNotFoundError, match="render_figures"):
        show_diagram("x", figures=tmp_path)
    (tmp_path / "x.png").write_bytes(b"<svg/>")
    with pytest.raises(ValueError, match="not a PNG"):
        show_diagram("x", figures=tmp_path)
    (tmp_path / "descriptions.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        show_diagram("x", figures=tmp_path)
    with pytest.raises(FileNotFoundError, match="checkout"):
        show_diagram("x", figures=tmp_path / "absent")


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
                    assert text.startswith(("Plot: ", "Diagram ")), f"{path.name} cell {index}: {text[:60]!r}"


def test_nbconvert_html_shows_the_diagram_as_an_image():
    """What JupyterLab's HTML export shows: the committed output as an <img>, the PNG inline."""
    import base64

    import nbformat
    from nbconvert import HTMLExporter

    path = FIGURES.parent / "part04_attention.ipynb"
    html, _ = HTMLExporter().from_notebook_node(nbformat.read(path, as_version=4))
    png = base64.b64encode((FIGURES / "part04_attention.png").read_bytes()).decode("ascii")
    assert f'src="data:image/png;base64,{png}"' in html
