"""The price table: USD per machine-hour behind the audit's cost columns and the preflight's cloud-cost estimate.

The table is data (`prices.yaml` next to this file, or the copy `audit.prices` names):

    currency: USD
    serving_machine: <a key of machines>    the machine the audit's latencies are priced on
    training_machine: <a key of machines>   the machine the audit's probe is priced on
    machines: {NAME: {usd_per_hour: float, note: str, gpu_peak_bf16_flops: float (optional, dense FLOP/s)}}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunegate import TunegateError

DEFAULT_PRICES = Path(__file__).resolve().parent / "prices.yaml"


def load_prices(path: Path | None) -> dict[str, Any]:
    """The price table at `path` (None: tunegate's own `prices.yaml`), with `path` added (the file read, a str).

    Raises:
        TunegateError: the file does not exist, or `serving_machine` / `training_machine` is not one of `machines`.
    """
    import yaml

    path = path or DEFAULT_PRICES
    if not path.is_file():
        raise TunegateError(f"{path}: price table not found (audit.prices)")
    prices = yaml.safe_load(path.read_text())
    for role in ("serving_machine", "training_machine"):
        if prices.get(role) not in (prices.get("machines") or {}):
            raise TunegateError(f"{path}: {role} {prices.get(role)!r} is not one of the machines listed under `machines`")
    prices["path"] = str(path)
    return prices
