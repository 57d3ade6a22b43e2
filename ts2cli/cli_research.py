"""``ts2 eval`` and ``ts2 train``: measure retrieval quality and fine-tune TS2-Net (thin commands, see
``ts2cli.evaluate`` and ``ts2cli.train``). Heavy modules are imported inside the commands so ``ts2 --help`` stays
fast, and ``ts2cli.cli`` (which imports this module) only inside them too, to avoid an import cycle."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from .cli_options import (
    DEFAULT_PRETRAINED,
    Checkpoint,
    Compat,
    Device,
    HeadChoice,
    InferencePrecision,
    JsonFlag,
    ModelName,
    Pretrained,
    TiesChoice,
    TopK,
    TrainPrecisionChoice,
)
from .datasets import EVAL_BATCH_SIZE
from .markup import counted, shown

if TYPE_CHECKING:
    from .datasets import CaptionSet
    from .evaluate import EvalResult
    from .model import ModelOptions
    from .train import TrainSummary

eval_app = typer.Typer(
    help="Retrieval metrics (R@1/5/10, MdR, MnR) on MSR-VTT 1k-A or your own caption list.", no_args_is_help=True
)
train_app = typer.Typer(help="Fine-tune TS2-Net from CLIP with the paper's recipe.", no_args_is_help=True)

METRIC_KEYS = ("R@1", "R@5", "R@10", "MdR", "MnR")
DIRECTIONS = {
    "t2v": "text → video",
    "v2t": "video → text",
    "t2v_dsl": "text → video, DSL",
    "v2t_dsl": "video → text, DSL",
}

# --- options ----------------------------------------------------------------------------------------------------
Frames = Annotated[
    int | None,
    typer.Option(
        "--frames",
        metavar="N",
        min=1,
        help="Frames per video (T). Default: a checkpoint's own, else 12.",
        rich_help_panel="Model",
    ),
]
Workers = Annotated[int | None, typer.Option("--workers", metavar="N", min=1, help="Decoding threads (default: auto).")]
AllowMissing = Annotated[
    bool, typer.Option("--allow-missing", help="Use the videos that exist when some listed ones are missing.")
]
Ties = Annotated[
    TiesChoice, typer.Option("--ties", help="strict (one rank per query) or official (the reference's tie counting).")
]
Dsl = Annotated[
    bool, typer.Option("--dsl", help="Also report metrics after the inverted softmax (transductive: uses all queries).")
]
CacheDir = Annotated[
    Path | None,
    typer.Option("--cache-dir", metavar="DIR", help="Feature cache folder (default: the user cache folder)."),
]
NoCache = Annotated[bool, typer.Option("--no-cache", help="Neither read nor write cached video features.")]
EvalBatch = Annotated[int, typer.Option("--batch-size", metavar="N", min=1, help="Videos per model batch.")]

Out = Annotated[
    Path, typer.Option("--out", metavar="DIR", help="Folder for checkpoints (epoch-N.safetensors, last.safetensors).")
]
Epochs = Annotated[int, typer.Option("--epochs", metavar="N", min=1, rich_help_panel="Recipe")]
BatchSize = Annotated[
    int, typer.Option("--batch-size", metavar="N", min=2, help="Global batch.", rich_help_panel="Recipe")
]
MicroBatch = Annotated[
    int,
    typer.Option(
        "--micro-batch", metavar="N", min=1, help="Videos encoded at once (memory).", rich_help_panel="Recipe"
    ),
]
Lr = Annotated[float, typer.Option("--lr", metavar="X", min=0.0, help="lr of the new parts.", rich_help_panel="Recipe")]
ClipLr = Annotated[
    float, typer.Option("--clip-lr", metavar="X", min=0.0, help="lr of the CLIP backbone.", rich_help_panel="Recipe")
]
WeightDecay = Annotated[float, typer.Option("--weight-decay", metavar="X", min=0.0, rich_help_panel="Recipe")]
Warmup = Annotated[
    float,
    typer.Option(
        "--warmup", metavar="X", min=0.0, max=1.0, help="Warm-up share of all steps.", rich_help_panel="Recipe"
    ),
]
Seed = Annotated[int, typer.Option("--seed", metavar="N", rich_help_panel="Recipe")]
Precision = Annotated[
    TrainPrecisionChoice,
    typer.Option(
        "--precision", help="auto (bf16/fp16 on CUDA, fp32 on CPU), fp32, fp16, bf16.", rich_help_panel="Recipe"
    ),
]
ClipFp16 = Annotated[
    bool,
    typer.Option(
        "--clip-fp16", help="The paper's setting: CLIP weights stored and updated in fp16.", rich_help_panel="Recipe"
    ),
]
SimulateRanks = Annotated[
    int,
    typer.Option(
        "--simulate-ranks",
        metavar="N",
        min=1,
        help="Scale gradients as the paper's N-GPU run did (8 for parity).",
        rich_help_panel="Recipe",
    ),
]
HeadOption = Annotated[
    HeadChoice,
    typer.Option("--head", help="ts2, or meanpool (baseline: mean of CLIP frames).", rich_help_panel="Recipe"),
]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last epoch.")]
EvalCsv = Annotated[
    Path | None, typer.Option("--eval-csv", metavar="FILE", help="Held-out video,caption list scored after each epoch.")
]
EvalVideos = Annotated[
    Path | None, typer.Option("--eval-videos", metavar="DIR", help="Folder of the --eval-csv videos.")
]
TrainPretrained = Annotated[
    str | None,
    typer.Option(
        "--pretrained",
        metavar="TAG|FILE|none",
        help=f"open_clip weights tag, a local weights file, or none: random weights (default: {DEFAULT_PRETRAINED}).",
        rich_help_panel="Model",
        show_default=False,
    ),
]


# --- ts2 eval ---------------------------------------------------------------------------------------------------
@eval_app.command("msrvtt")
def eval_msrvtt(
    data: Annotated[
        Path, typer.Option("--data", metavar="DIR", help="Folder with MSRVTT_JSFUSION_test.csv and the videos.")
    ],
    allow_missing: AllowMissing = False,
    dsl: Dsl = False,
    ties: Ties = "strict",
    batch_size: EvalBatch = EVAL_BATCH_SIZE,
    workers: Workers = None,
    cache_dir: CacheDir = None,
    no_cache: NoCache = False,
    frames: Frames = None,
    model: ModelName = None,
    pretrained: Pretrained = None,
    checkpoint: Checkpoint = None,
    device: Device = "auto",
    compat: Compat = None,
    topk: TopK = None,
    precision: InferencePrecision = "auto",
    as_json: JsonFlag = False,
) -> None:
    """Score a model on MSR-VTT 1k-A (1000 captions, one video each), CLIP4Clip's folder layout."""

    def load() -> CaptionSet:
        from .datasets import load_msrvtt_test
        from .evaluate import check_msrvtt_dir

        check_msrvtt_dir(data)
        return load_msrvtt_test(data, allow_missing=allow_missing)

    options = _eval_options(batch_size, workers, ties, dsl, cache_dir, no_cache)
    _run_eval(load, _model(model, pretrained, checkpoint, device, compat, frames, precision, topk), options, as_json)


@eval_app.command("captions")
def eval_captions(
    csv: Annotated[Path, typer.Option("--csv", metavar="FILE", help="A video,caption list (header row required).")],
    videos: Annotated[
        Path | None, typer.Option("--videos", metavar="DIR", help="Folder the CSV's paths are relative to.")
    ] = None,
    allow_missing: AllowMissing = False,
    dsl: Dsl = False,
    ties: Ties = "strict",
    batch_size: EvalBatch = EVAL_BATCH_SIZE,
    workers: Workers = None,
    cache_dir: CacheDir = None,
    no_cache: NoCache = False,
    frames: Frames = None,
    model: ModelName = None,
    pretrained: Pretrained = None,
    checkpoint: Checkpoint = None,
    device: Device = "auto",
    compat: Compat = None,
    topk: TopK = None,
    precision: InferencePrecision = "auto",
    as_json: JsonFlag = False,
) -> None:
    """Score a model on your own captioned videos (a video may have several captions)."""

    def load() -> CaptionSet:
        from .datasets import load_caption_csv

        return load_caption_csv(csv, videos, allow_missing=allow_missing)

    options = _eval_options(batch_size, workers, ties, dsl, cache_dir, no_cache)
    _run_eval(load, _model(model, pretrained, checkpoint, device, compat, frames, precision, topk), options, as_json)


def _eval_options(batch_size: int, workers: int | None, ties: str, dsl: bool, cache_dir: Path | None, no_cache: bool):
    from .evaluate import EvalOptions, default_cache_dir

    cache = None if no_cache else (cache_dir or default_cache_dir())
    return EvalOptions(batch_size=batch_size, workers=workers, ties=ties, dsl=dsl, cache_dir=cache)  # type: ignore[arg-type]


def _model(
    model: str | None,
    pretrained: str | None,
    checkpoint: Path | None,
    device: str,
    compat: str | None,
    frames: int | None,
    precision: str = "auto",
    topk: str | None = None,
):
    from .cli import model_options, unused_beside_checkpoint

    model, pretrained = unused_beside_checkpoint(model, pretrained, checkpoint)
    options = model_options(model, pretrained, checkpoint, device, compat, precision, topk)
    weights = None if (pretrained or "").lower() == "none" else options.pretrained
    return dataclasses.replace(options, pretrained=weights, frames=frames)


def _run_eval(load: Callable[[], CaptionSet], model: ModelOptions, options: Any, as_json: bool) -> None:
    from .cli import console, on_interrupt, output, print_json
    from .evaluate import evaluate
    from .model import load_model
    from .progress import ResearchProgress

    if options.cache_dir is not None:
        on_interrupt("Interrupted; decoded videos are cached: run the command again to go on.")

    data = load()
    loaded = load_model(model)  # before the bar: a first use downloads the weights, with a progress of its own
    with ResearchProgress(console, enabled=not as_json) as bar:
        result = evaluate(loaded, data, options, progress=bar)
    if as_json:
        print_json(result.to_json())
        return
    output.print(eval_table(result))
    if result.failed:
        first = shown("; ".join(f"{video}: {reason}" for video, reason in result.failed[:3]))
        more = f" and {len(result.failed) - 3} more" if len(result.failed) > 3 else ""
        how = "counted as misses" if result.ties == "strict" else "their captions left out, as the reference does"
        videos = counted(len(result.failed), "video")
        console.print(f"[yellow]{videos} could not be decoded[/yellow] ({how}): {first}{more}")
    if result.missing:
        videos = "1 listed video is" if len(result.missing) == 1 else f"{len(result.missing)} listed videos are"
        console.print(f"[yellow]{videos} missing[/yellow]: not comparable to full-set numbers.")
    if result.truncated:
        captions = "1 caption was" if result.truncated == 1 else f"{result.truncated} captions were"
        console.print(
            f"[yellow]note:[/yellow] {captions} longer than the model reads: cut to fit, as the reference does."
        )


def eval_table(result: EvalResult) -> Table:
    cache = result.cache
    table = Table(
        title=f"{result.queries} captions × {result.videos} videos",
        caption=(
            f"ties: {result.ties}; frames: {result.sampling}; cached {cache['hits']}, decoded {cache['decoded']}"
            + ("; DSL = inverted softmax over all queries (transductive)" if "t2v_dsl" in result.metrics else "")
        ),
    )
    table.add_column("direction")
    for key in METRIC_KEYS:
        table.add_column(key, justify="right")
    for name, label in DIRECTIONS.items():
        if name in result.metrics:
            table.add_row(label, *(f"{result.metrics[name][key]:.1f}" for key in METRIC_KEYS))
    return table


# --- ts2 train --------------------------------------------------------------------------------------------------
@train_app.command("msrvtt")
def train_msrvtt(
    data: Annotated[
        Path, typer.Option("--data", metavar="DIR", help="Folder with MSRVTT_train.9k.csv, MSRVTT_data.json, videos.")
    ],
    out: Out,
    eval_test: Annotated[
        bool, typer.Option("--eval-test", help="Score the 1k-A test split after each epoch, as the paper does.")
    ] = False,
    per_video: Annotated[
        bool, typer.Option("--per-video", help="One item per video with a random caption (default: per caption).")
    ] = False,
    allow_missing: AllowMissing = False,
    epochs: Epochs = 5,
    batch_size: BatchSize = 128,
    micro_batch: MicroBatch = 16,
    lr: Lr = 1e-4,
    clip_lr: ClipLr = 1e-7,
    weight_decay: WeightDecay = 0.2,
    warmup: Warmup = 0.1,
    seed: Seed = 42,
    precision: Precision = "auto",
    clip_fp16: ClipFp16 = False,
    simulate_ranks: SimulateRanks = 1,
    head: HeadOption = "ts2",
    resume: Resume = False,
    workers: Workers = None,
    frames: Frames = None,
    model: ModelName = None,
    pretrained: TrainPretrained = None,
    checkpoint: Checkpoint = None,
    device: Device = "auto",
    compat: Compat = None,
    as_json: JsonFlag = False,
) -> None:
    """Fine-tune on MSR-VTT 9k (180k caption-video pairs per epoch), CLIP4Clip's folder layout."""
    from .datasets import load_msrvtt_test, load_msrvtt_train
    from .evaluate import check_msrvtt_dir

    check_msrvtt_dir(data, training=True)
    train_set = load_msrvtt_train(data, expand_sentences=not per_video, allow_missing=allow_missing)
    eval_set = None
    if eval_test:
        check_msrvtt_dir(data)
        eval_set = load_msrvtt_test(data, allow_missing=allow_missing)
    _resume_note(resume, model, pretrained, checkpoint)
    model_choice = _model(model, pretrained, checkpoint, device, compat, frames)
    name = f"MSR-VTT 9k ({os.path.abspath(data)})"  # the checkpoint records it: not relative to where it ran
    _run_train(train_set, eval_set, name, model_choice, _train_options(locals()), as_json)


@train_app.command("captions")
def train_captions(
    csv: Annotated[
        Path, typer.Option("--csv", metavar="FILE", help="Training video,caption list (header row required).")
    ],
    out: Out,
    videos: Annotated[
        Path | None, typer.Option("--videos", metavar="DIR", help="Folder the CSV's paths are relative to.")
    ] = None,
    eval_csv: EvalCsv = None,
    eval_videos: EvalVideos = None,
    allow_missing: AllowMissing = False,
    epochs: Epochs = 5,
    batch_size: BatchSize = 128,
    micro_batch: MicroBatch = 16,
    lr: Lr = 1e-4,
    clip_lr: ClipLr = 1e-7,
    weight_decay: WeightDecay = 0.2,
    warmup: Warmup = 0.1,
    seed: Seed = 42,
    precision: Precision = "auto",
    clip_fp16: ClipFp16 = False,
    simulate_ranks: SimulateRanks = 1,
    head: HeadOption = "ts2",
    resume: Resume = False,
    workers: Workers = None,
    frames: Frames = None,
    model: ModelName = None,
    pretrained: TrainPretrained = None,
    checkpoint: Checkpoint = None,
    device: Device = "auto",
    compat: Compat = None,
    as_json: JsonFlag = False,
) -> None:
    """Fine-tune on your own captioned videos (one item per caption and epoch)."""
    from .datasets import load_caption_csv

    if eval_videos is not None and eval_csv is None:
        raise typer.BadParameter(
            "it goes with --eval-csv, the list whose paths it resolves.", param_hint="--eval-videos"
        )
    train_set = load_caption_csv(csv, videos, allow_missing=allow_missing)
    eval_set = load_caption_csv(eval_csv, eval_videos, allow_missing=allow_missing) if eval_csv else None
    _resume_note(resume, model, pretrained, checkpoint)
    model_choice = _model(model, pretrained, checkpoint, device, compat, frames)
    _run_train(train_set, eval_set, os.path.abspath(csv), model_choice, _train_options(locals()), as_json)


def _resume_note(resume: bool, model: str | None, pretrained: str | None, checkpoint: Path | None) -> None:
    """A resumed run goes on with the weights of its last saved epoch: the model options it was started with are
    not read again."""
    if resume:
        from .cli import note_unused

        note_unused(
            {"--model": model, "--pretrained": pretrained, "--checkpoint": checkpoint},
            "not read again with --resume: the run goes on from its last saved epoch, with the model it was "
            "started from",
        )


def _train_options(args: dict[str, Any]):
    """TrainOptions from a command's arguments (``locals()``): its parameter names are TrainOptions' fields."""
    from .train import TrainOptions

    names = [f.name for f in dataclasses.fields(TrainOptions) if f.name in args]
    return TrainOptions(**{"out_dir": args["out"], **{name: args[name] for name in names}})


def _run_train(
    train_set: CaptionSet,
    eval_set: CaptionSet | None,
    name: str,
    model: ModelOptions,
    options: Any,
    as_json: bool,
) -> None:
    from .cli import console, on_interrupt, output, print_json
    from .progress import ResearchProgress
    from .train import interrupted_note, train

    on_interrupt(lambda: interrupted_note(options.out_dir))

    with ResearchProgress(console, enabled=not as_json) as bar:
        summary = train(model, train_set, options, eval_data=eval_set, data_name=name, progress=bar)
    if summary.resumed_from is not None and summary.resumed_from >= options.epochs:
        console.print(
            f"[yellow]note:[/yellow] The run in {shown(str(options.out_dir))} was already complete "
            f"({counted(options.epochs, 'epoch')}): nothing was trained or evaluated; below is its record.",
            soft_wrap=True,
        )
    if as_json:
        print_json(summary.to_json())
    else:
        output.print(train_table(summary))


def train_table(summary: TrainSummary) -> Table:
    best, last = summary.best_epoch, summary.epochs[-1] if summary.epochs else None
    notes = [f"use with: ts2 index --checkpoint {shown(str(summary.checkpoint))}"]
    if best is not None and last is not None:
        # The paper keeps the best epoch on the test list (spec §10.1 quirk 9): the last one is the honest number.
        notes.insert(0, f"best t2v R@1 at epoch {best.epoch}, last epoch {last.epoch}")
    if summary.failed:
        notes.append(f"{len(summary.failed)} videos could not be decoded and were left out")
    if summary.missing or summary.eval_missing:
        notes.append(
            f"{len(summary.missing)} training and {len(summary.eval_missing)} evaluation videos were missing "
            "(--allow-missing): not comparable to full-set numbers"
        )
    table = Table(title=f"training: {summary.steps} steps", caption="; ".join(notes))
    for column in ("epoch", "loss", "t2v R@1", "t2v R@5", "t2v R@10", "v2t R@1", "checkpoint"):
        table.add_column(column, justify="left" if column == "checkpoint" else "right")
    for record in summary.epochs:
        t2v = (record.metrics or {}).get("t2v", {})
        v2t = (record.metrics or {}).get("v2t", {})
        scores = [t2v.get("R@1"), t2v.get("R@5"), t2v.get("R@10"), v2t.get("R@1")]
        cells = ["-" if s is None else f"{s:.1f}" for s in scores]
        table.add_row(str(record.epoch), f"{record.loss:.4f}", *cells, shown(Path(record.checkpoint).name))
    return table
