"""Typer option types shared by every command that loads a model (``ts2cli.cli`` and ``ts2cli.cli_research``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

# The choices, spelled out again so that the command line does not import torch (ts2cli.model does);
# tests/test_cli_model.py checks that they equal the library's own lists.
DeviceChoice = Literal["auto", "cpu", "cuda"]
CompatChoice = Literal["fixed", "official"]
TopKChoice = Literal["perturbed", "hard"]
InferencePrecisionChoice = Literal["auto", "float32"]
TrainPrecisionChoice = Literal["auto", "fp32", "fp16", "bf16"]
TiesChoice = Literal["strict", "official"]
HeadChoice = Literal["ts2", "meanpool"]

DEFAULT_MODEL, DEFAULT_PRETRAINED = "ViT-B-32", "openai"
# None when not given, so that a --checkpoint, which brings its own backbone and weights, can refuse them.
ModelName = Annotated[
    str | None,
    typer.Option(
        "--model",
        metavar="NAME|CONFIG.json",
        help=f"open_clip model name (a CLIP ViT), or an open_clip JSON config file (default: {DEFAULT_MODEL}).",
        rich_help_panel="Model",
        show_default=False,
    ),
]
Pretrained = Annotated[
    str | None,
    typer.Option(
        "--pretrained",
        metavar="TAG|FILE",
        help=f"open_clip weights tag, or a local CLIP weights file (default: {DEFAULT_PRETRAINED}).",
        rich_help_panel="Model",
        show_default=False,
    ),
]
Checkpoint = Annotated[
    Path | None,
    typer.Option(
        "--checkpoint", metavar="FILE", help="TS2-Net weights (ts2's own or official).", rich_help_panel="Model"
    ),
]
Device = Annotated[DeviceChoice, typer.Option("--device", help="auto, cpu or cuda.", rich_help_panel="Model")]
Compat = Annotated[
    CompatChoice | None,
    typer.Option(
        "--compat",
        help="fixed (corrected) or official (reproduces the paper's code). Default: a checkpoint's own, else fixed.",
        rich_help_panel="Model",
    ),
]
TopK = Annotated[
    TopKChoice | None,
    typer.Option(
        "--topk",
        help="How a trained TS2-Net selects tokens: perturbed (as trained) or hard (plain top-k). "
        "Default: a checkpoint's own, else perturbed.",
        rich_help_panel="Model",
    ),
]
InferencePrecision = Annotated[
    InferencePrecisionChoice,
    typer.Option(
        "--precision",
        help="auto (fp16 on CUDA; bf16 on CPUs where it is accurate and faster) or float32 (reproducible).",
        rich_help_panel="Model",
    ),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]
