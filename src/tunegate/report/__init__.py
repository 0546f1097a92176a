"""Run reports (HTML and Markdown) with plots."""
