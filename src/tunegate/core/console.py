"""The one console every stage and verb prints to (stderr, so stdout stays for machine-readable output)."""

from __future__ import annotations

from rich.console import Console

console = Console(stderr=True)
