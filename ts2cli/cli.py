"""The ``ts2`` command line. Commands parse options, call library functions and render; nothing else lives here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from . import __version__
from .errors import Ts2Error

app = typer.Typer(
    name="ts2",
    help="Search your videos by describing what happens in them (TS2-Net on CLIP).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True, highlight=False)
_state = {"debug": False}

# --- options shared by every command that loads a model ---------------------------------------------------------
ModelName = Annotated[
    str,
    typer.Option(
        "--model",
        help="open_clip model name (a CLIP ViT), or an open_clip JSON config file.",
        rich_help_panel="Model",
    ),
]
Pretrained = Annotated[
    str,
    typer.Option("--pretrained", help="open_clip weights tag, or a local CLIP weights file.", rich_help_panel="Model"),
]
Checkpoint = Annotated[
    Path | None,
    typer.Option("--checkpoint", help="TS2-Net weights (ts2's own or official).", rich_help_panel="Model"),
]
Device = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.", rich_help_panel="Model")]
Compat = Annotated[
    str,
    typer.Option(
        "--compat",
        help="fixed (corrected) or official (reproduces the paper's code).",
        rich_help_panel="Model",
    ),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]


def model_options(model: str, pretrained: str, checkpoint: Path | None, device: str, compat: str):
    from .model import COMPAT_MODES, ModelOptions

    if compat not in COMPAT_MODES:
        raise Ts2Error(f"Unknown --compat '{compat}'; use fixed or official.")
    backbone_cfg = None
    if model.endswith(".json"):
        from .model.backbone import read_model_config

        backbone_cfg = read_model_config(Path(model))
        model = Path(model).stem
    return ModelOptions(
        model=model,
        pretrained=pretrained,
        checkpoint=checkpoint,
        device=device,
        compat=compat,  # type: ignore[arg-type]
        backbone_cfg=backbone_cfg,
    )


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"ts2 {__version__}\n")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    _state["debug"] = debug


@app.command("model")
def model_command(
    model: ModelName = "ViT-B-32",
    pretrained: Pretrained = "openai",
    checkpoint: Checkpoint = None,
    device: Device = "auto",
    compat: Compat = "fixed",
    as_json: JsonFlag = False,
) -> None:
    """Load the model and describe it: backbone, weights, zero-shot or trained, compat mode, device."""
    from .model import load_model
    from .report import describe_model, model_table

    loaded = load_model(model_options(model, pretrained, checkpoint, device, compat))
    report = describe_model(loaded)
    if as_json:
        print_json(report)
    else:
        console.print(model_table(report))


def main() -> None:
    try:
        app()
    except Ts2Error as error:
        if _state["debug"]:
            raise
        console.print(f"[red]error:[/red] {error}", soft_wrap=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        console.print("Interrupted; finished work is kept, run the command again to resume.")
        sys.exit(130)
