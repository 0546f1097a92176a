"""The one Jinja environment and the chart helpers every page and document of tunegate is rendered with."""

from __future__ import annotations

import base64
from pathlib import Path


def environment(documents: bool = False):
    """The Jinja environment over `report/templates/`.

    Pages (`*.html.j2`) escape every value; Markdown templates (`*.md.j2`) do not. documents: the release
    documents' settings (model card, Article 25, DPIA): an undefined name raises instead of rendering empty,
    block tags leave no blank lines, and the trailing newline is kept.
    """
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    loader = PackageLoader("tunegate", "report/templates")
    if documents:
        return Environment(loader=loader, autoescape=False, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                           keep_trailing_newline=True)
    return Environment(loader=loader, autoescape=select_autoescape(["html", "html.j2"]))


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_data_uri(path: Path) -> str | None:
    """A PNG file as a `data:` URI, so a page embeds its plots and reads offline; None when the file is absent."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode() if path.is_file() else None


# White box behind a value label, so it reads over a bar, a line or a grid.
LABEL_BOX = {"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85}


def keep_labels_inside(ax, pad_px: float = 2.0) -> None:
    """Move every text label of `ax` (`ax.text`, `ax.annotate`) that sticks out of the axes back inside them, by
    the fewest pixels. Call after `fig.tight_layout()` (the axes must have their final size) and before saving."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    box = ax.get_window_extent(renderer)
    for t in ax.texts:
        ext = t.get_window_extent(renderer)
        dx = dy = 0.0
        if ext.x1 > box.x1 - pad_px:
            dx = box.x1 - pad_px - ext.x1
        if ext.x0 + dx < box.x0 + pad_px:
            dx = box.x0 + pad_px - ext.x0
        if ext.y1 > box.y1 - pad_px:
            dy = box.y1 - pad_px - ext.y1
        if ext.y0 + dy < box.y0 + pad_px:
            dy = box.y0 + pad_px - ext.y0
        if not (dx or dy):
            continue
        if hasattr(t, "xyann") and t.anncoords == "offset points":  # an annotation placed at an offset from its point
            x, y = t.xyann
            t.xyann = (x + dx * 72 / fig.dpi, y + dy * 72 / fig.dpi)
        else:
            tr = t.get_transform()
            x, y = tr.transform(t.get_position())
            t.set_position(tr.inverted().transform((x + dx, y + dy)))
