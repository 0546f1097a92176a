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


def error_bar(s) -> list[list[float]]:
    """matplotlib's [[below], [above]] error lengths of {mean, ci_low, ci_high}, clipped at 0: a percentile
    bootstrap CI of a corpus statistic (macro-F1, a ratio) need not contain its point estimate, and matplotlib
    refuses a negative length."""
    return [[max(0.0, s["mean"] - s["ci_low"])], [max(0.0, s["ci_high"] - s["mean"])]]


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
    the fewest pixels, then move labels that overlap an earlier one up (or down, where up would leave the axes)
    past it. Call after `fig.tight_layout()` (the axes must have their final size) and before saving."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    box = ax.get_window_extent(renderer)

    def inside(t) -> None:
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
        if dx or dy:
            _shift(t, dx, dy, fig.dpi)

    placed = []
    for t in sorted(ax.texts, key=lambda t: t.get_window_extent(renderer).y0):
        inside(t)
        for _ in range(len(placed)):
            ext = t.get_window_extent(renderer)
            hit = next((p for p in placed if ext.overlaps(p)), None)
            if hit is None:
                break
            up = hit.y1 - ext.y0 + 1
            _shift(t, 0, up if ext.y1 + up <= box.y1 - pad_px else -(ext.y1 - hit.y0 + 1), fig.dpi)
            inside(t)
        placed.append(t.get_window_extent(renderer))


def _shift(t, dx: float, dy: float, dpi: float) -> None:
    """Move text `t` by (dx, dy) pixels: an annotation's offset, or a plain text's position."""
    if hasattr(t, "xyann") and t.anncoords == "offset points":  # an annotation placed at an offset from its point
        x, y = t.xyann
        t.xyann = (x + dx * 72 / dpi, y + dy * 72 / dpi)
    else:
        tr = t.get_transform()
        x, y = tr.transform(t.get_position())
        t.set_position(tr.inverted().transform((x + dx, y + dy)))
