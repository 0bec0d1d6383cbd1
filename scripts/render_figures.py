"""Render the series' diagrams: every notebooks/figures/*.svg to a PNG beside it, at 2x, on white.

Usage: python scripts/render_figures.py [--force] [FIGURE.svg ...]

The SVG files are the editable sources; the PNGs are what the notebooks' markdown links to.
Only figures whose PNG is missing or older than the SVG are rendered, unless --force is given. Rendering uses
``rsvg-convert`` (Debian/Ubuntu: ``apt-get install librsvg2-bin``; macOS: ``brew install librsvg``)
and falls back to the ``cairosvg`` Python package (``pip install cairosvg``) when that is missing.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from helpers.runtime import write_atomically  # noqa: E402  (after the path set-up above)

FIGURES = ROOT / "notebooks" / "figures"
SCALE = 2  # pixels per SVG unit: crisp on high-density screens, still small files
SIZE_WARNING_BYTES = 150_000


class RendererMissing(RuntimeError):
    """Neither rsvg-convert nor cairosvg is available; the message says how to install one."""


def find_renderer() -> Callable[[Path, Path], None]:
    """Return a function ``render(svg, png)``: rsvg-convert if installed, else cairosvg."""
    executable = shutil.which("rsvg-convert")
    if executable:
        def render_with_rsvg(svg: Path, png: Path) -> None:
            subprocess.run([executable, "--zoom", str(SCALE), "--background-color", "white",
                            "--format", "png", "--output", str(png), str(svg)], check=True)
        return render_with_rsvg
    try:
        import cairosvg
    except ImportError:
        raise RendererMissing(
            "no SVG renderer found: install rsvg-convert (apt-get install librsvg2-bin, or brew install librsvg) "
            "or the cairosvg package (pip install cairosvg), then run this script again"
        ) from None

    def render_with_cairosvg(svg: Path, png: Path) -> None:
        cairosvg.svg2png(url=str(svg), write_to=str(png), scale=SCALE, background_color="white")
    return render_with_cairosvg


def is_stale(svg: Path) -> bool:
    """True when the PNG beside ``svg`` is missing or older than it."""
    png = svg.with_suffix(".png")
    return not png.exists() or png.stat().st_mtime < svg.stat().st_mtime


def shrink_png(png: Path) -> None:
    """Rewrite ``png`` with a 256-colour palette (flat diagrams lose nothing visible, the file ~3x less).

    Needs Pillow; without it the full-colour PNG is kept as rendered.
    """
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(png) as image:
        palette = image.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE,
                                                dither=Image.Dither.NONE)
    colours = palette.getpalette()
    palette.putpalette([255 if min(colours[i:i + 3]) >= 250 else c  # near-white entries back to pure white
                        for i in range(0, len(colours), 3) for c in colours[i:i + 3]])
    palette.save(png, format="PNG", optimize=True)


def render_figure(svg: Path, render: Callable[[Path, Path], None]) -> Path:
    """Render ``svg`` to the PNG beside it (atomically, palette-compressed) and return the PNG's path."""
    def write(tmp: Path) -> None:
        render(svg, tmp)
        shrink_png(tmp)
    return write_atomically(svg.with_suffix(".png"), write)


def main(argv: list[str] | None = None) -> int:
    """Render the stale (or, with --force, all) figures; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("figures", nargs="*", type=Path, help="SVG files (default: every notebooks/figures/*.svg)")
    parser.add_argument("--force", action="store_true", help="render even where the PNG is up to date")
    args = parser.parse_args(argv)
    svgs = args.figures or sorted(FIGURES.glob("*.svg"))
    missing = [svg for svg in svgs if not svg.is_file()]
    if missing:
        print(f"no such SVG file: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    todo = [svg for svg in svgs if args.force or is_stale(svg)]
    if not todo:
        print(f"all {len(svgs)} figures are up to date")
        return 0
    try:
        render = find_renderer()
    except RendererMissing as error:
        print(error, file=sys.stderr)
        return 1
    for svg in todo:
        png = render_figure(svg, render)
        size = png.stat().st_size
        note = f"  (over {SIZE_WARNING_BYTES // 1000} KB: simplify the drawing)" if size > SIZE_WARNING_BYTES else ""
        print(f"{png.relative_to(ROOT) if png.is_relative_to(ROOT) else png}: {size / 1000:.0f} KB{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
