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
