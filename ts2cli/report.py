"""How the model and library are described to people and in ``--json`` output."""

from __future__ import annotations

from typing import Any

from rich.table import Table

ZERO_SHOT_NOTE = (
    "zero-shot: CLIP frame features combined by the TS2 similarity; no trained TS2-Net parts "
    "(pass --checkpoint for a trained model)"
)


def describe_model(loaded: Any) -> dict[str, Any]:
    """The model's identity plus where it runs; ``mode`` and ``note`` say whether it is zero-shot."""
    identity = dict(loaded.identity)
    note = ZERO_SHOT_NOTE if identity["mode"] == "zero-shot" else "trained TS2-Net"
    return {**identity, "note": note, "device": str(loaded.device), "dtype": _dtype_name(loaded.dtype)}


def _dtype_name(dtype: Any) -> str:
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")


def model_table(report: dict[str, Any]) -> Table:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in report.items():
        table.add_row(key, "-" if value is None else str(value))
    return table
