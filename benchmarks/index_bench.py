"""Measure ``ts2 index`` against a plain loop and against the machine's own matrix-multiply rate.

Run ``python benchmarks/index_bench.py`` from the repository root (``--quick`` for a smaller set). In one run,
on the same videos (../shared/videos plus synthetic H.264 640x360 clips of 10 s, 60 s and 300 s, generated once
into ``--workdir``), it measures:

1. videos/s of the pipelined indexer (the real ``index_folders``, into a fresh library each time) against a
   sequential loop: for each video ``sample_frames`` then ``encode_videos([frames])``, fp32, one at a time;
2. model frames/s against the arithmetic floor: FLOPs per frame (counted from the model config) divided by the
   GEMM rate this machine sustains on the model's own matrix shapes, same dtype and thread count (GEMM windows as
   long as a batch and model batches taken in turns, each batch judged against the windows beside it); for the
   zero-shot backbone (what ``ts2 index`` runs without a checkpoint) and for a TS2-Net forward; on the CPU also
   where a batch's time goes (torch profiler: matrix products, attention, layer norms, the rest) and the ratio
   the work outside the products leaves possible;
3. where the indexer's time goes: how much of the time the model workers and the decode workers sat idle
   (each waiting on the other), from the counters ``index_folders`` keeps (``IndexSummary.pipeline``);
4. on CUDA (``--device cuda``, or auto when a GPU is present): the same on the GPU, fp16, and where the
   bottleneck sits.

``--sweep`` also times the indexer over decode threads, model workers × torch threads, batch size and a process pool
(the measurements behind ``thread_plan`` and ``default_batch_size`` in ts2cli/indexer.py). The model is
ViT-B-32 with random weights saved to a local file: speed does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import itertools
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ts2cli import indexer
from ts2cli.cores import available_cores
from ts2cli.decode import sample_frames
from ts2cli.indexer import IndexOptions, IndexSummary, index_folders, thread_plan
from ts2cli.model import LoadedModel, ModelOptions, load_model
from ts2cli.model.precision import cast_copy, cpu_has_native_bf16
from ts2cli.store import Library

REPO = Path(__file__).resolve().parents[1]
SHARED_VIDEOS = REPO.parent / "shared" / "videos"
MODEL = "ViT-B-32"
GENERATED = [  # (seconds, how many); every clip gets its own noise seed, so no two files share content
    (10, 8),
    (60, 2),
    (300, 1),
]
QUICK_GENERATED = [(10, 4), (60, 1)]
BACKBONE = "zero-shot backbone"
TS2 = "TS2-Net forward"
# Videos per forward in the model-only measurements: on the CPU 4 × 12 frames × 50 tokens = 2400 rows already
# keep the GEMMs efficient; a GPU needs far more work per launch to fill.
MODEL_BATCH = {"cpu": 4, "cuda": 32}
PAIRED_SECONDS = 20.0
"""Time per model and dtype for batches and GEMM windows in turns: 6-10 pairs on one CPU thread."""


# ---------------------------------------------------------------------------------------------- inputs


def _load_writer() -> Callable[..., object]:
    """The synthetic-video writer lives with the tests; load it by path (tests/ is not a package)."""
    spec = importlib.util.spec_from_file_location("_ts2_test_videos", REPO / "tests" / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is being built
    spec.loader.exec_module(module)
    return module.write_video


def prepare_videos(workdir: Path, quick: bool) -> Path:
    """A folder holding the benchmark's videos: synthetic clips (cached in ``workdir``) and the shared samples."""
    cache = workdir / "generated"
    cache.mkdir(parents=True, exist_ok=True)
    folder = workdir / ("videos-quick" if quick else "videos")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    write_video = None
    for seconds, count in QUICK_GENERATED if quick else GENERATED:
        for seed in range(count):
            path = cache / f"h264_{seconds}s_{seed}.mp4"
            if not path.exists():
                write_video = write_video or _load_writer()
                began = time.perf_counter()
                part = path.with_name(f"part-{path.name}")
                write_video(part, seconds=seconds, fps=25, width=640, height=360, texture=True, crf=23, seed=seed)
                part.rename(path)
                print(f"generated {path.name} in {time.perf_counter() - began:.0f} s", file=sys.stderr)
            (folder / path.name).symlink_to(path)
    for path in sorted(SHARED_VIDEOS.glob("*")) if SHARED_VIDEOS.is_dir() else []:
        (folder / path.name).symlink_to(path)
    return folder


def prepare_weights(workdir: Path) -> Path:
    """ViT-B-32 (QuickGELU, as OpenAI's) at random weights, saved once as a local file."""
    path = workdir / "vit-b-32-random.safetensors"
    if not path.exists():
        import open_clip
        from safetensors.torch import save_file

        clip = open_clip.create_model(f"{MODEL}-quickgelu")
        save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    return path


def load(weights: Path, device: str, *, trainable: bool = False) -> LoadedModel:
    return load_model(ModelOptions(model=MODEL, pretrained=str(weights), device=device), trainable=trainable)


def settle_precision(model: LoadedModel, videos: list[np.ndarray]) -> None:
    """Let the model pick its precision (bf16 weights on CPU only where accurate and faster) on real frames,
    outside the timings."""
    if not model.precision_known:
        model.choose_precision(*model.video_batch(videos))


def reduced_precision(model: LoadedModel) -> list[LoadedModel]:
    """The fp32 ``model`` in the reduced precision the device could use (fp16 autocast on CUDA, bf16 weights on a
    CPU with native bf16), whether or not ``choose_precision`` picks it: the table shows why it does or not."""
    if model.device.type == "cuda":
        return [dataclasses.replace(model, dtype=torch.float16, precision_known=True)]
    if cpu_has_native_bf16():
        return [dataclasses.replace(model, net=cast_copy(model.net, torch.bfloat16), dtype=torch.bfloat16)]
    return []


def fp32(model: LoadedModel) -> LoadedModel:
    """A model that stays in fp32 (loaded without settling its precision)."""
    assert model.dtype is None or model.device.type == "cuda", "the CPU model was already cast"
    return dataclasses.replace(model, dtype=None, precision_known=True)


def dtype_name(dtype: torch.dtype | None) -> str:
    return "fp32" if dtype is None else str(dtype).removeprefix("torch.").replace("bfloat", "bf").replace("float", "fp")


# ------------------------------------------------------------------------------------ 1. indexer speed


@dataclass(frozen=True)
class Timing:
    wall_s: float
    cpu_s: float
    """CPU time of the process, all threads: what the run cost, whatever share of the machine it got."""


def sequential_run(paths: list[Path], model: LoadedModel) -> Timing:
    """The straightforward loop: decode one video, embed it, next. It samples the same frames as the indexer
    (keyframe snapping), so that the comparison is about the pipeline, not the sampling."""
    began, cpu_began = time.perf_counter(), time.process_time()
    for path in paths:
        video = sample_frames(path, model.config.frames, model.image_size, keyframe_snap=indexer.KEYFRAME_SNAP)
        model.encode_videos([video.frames])
    return Timing(time.perf_counter() - began, time.process_time() - cpu_began)


def pipelined_run(folder: Path, model: LoadedModel, workdir: Path, **options: Any) -> tuple[Timing, IndexSummary]:
    """The whole ``index_folders`` (scan, fingerprints, decode → embed, store) into a fresh library; model
    loading is outside the timing, as for the loop."""
    library_dir = Path(tempfile.mkdtemp(prefix="library-", dir=workdir))
    try:
        with Library.open(library_dir, write=True, create=True) as library:
            began, cpu_began = time.perf_counter(), time.process_time()
            summary = index_folders(library, model, IndexOptions(roots=[folder], **options))
            timing = Timing(time.perf_counter() - began, time.process_time() - cpu_began)
    finally:
        shutil.rmtree(library_dir, ignore_errors=True)
    if summary.failed or summary.indexed == 0:
        raise RuntimeError(f"indexed {summary.indexed} videos, failures: {summary.failed}")
    return timing, summary


@dataclass
class Comparison:
    videos: int
    dtype: str
    """What the pipelined indexer's model ran in."""
    sequential: list[Timing] = field(default_factory=list)
    pipelined: list[Timing] = field(default_factory=list)
    summaries: list[IndexSummary] = field(default_factory=list)

    @property
    def ratios(self) -> list[float]:
        """Speed-up per repeat: each pipelined run against the loop run next to it (same load on the machine)."""
        return [s.wall_s / p.wall_s for s, p in zip(self.sequential, self.pipelined, strict=True)]


def compare_indexers(
    folder: Path, model: LoadedModel, baseline: LoadedModel, workdir: Path, repeats: int
) -> Comparison:
    """``model`` runs the indexer in its chosen precision; ``baseline`` (fp32) runs the loop."""
    paths = sorted(folder.iterdir())
    result = Comparison(videos=len(paths), dtype=dtype_name(model.dtype))
    for repeat in range(repeats):
        result.sequential.append(sequential_run(paths, baseline))
        timing, summary = pipelined_run(folder, model, workdir)
        result.pipelined.append(timing)
        result.summaries.append(summary)
        loop, pipe = result.sequential[-1].wall_s, timing.wall_s
        print(f"repeat {repeat + 1}: loop {loop:.1f} s, pipelined {pipe:.1f} s", file=sys.stderr)
    return result


# ------------------------------------------------------------------------------ 2. model vs the floor


def vit_flops_per_frame(cfg: dict[str, Any]) -> float:
    """FLOPs (2 per multiply-add) of one frame through the ViT as ts2 runs it, from the open_clip config.

    Patch embedding, then per block the QKV and output projections, the two attention products and the MLP,
    then the projection of every token (``encode_frame_tokens`` projects them all). Layer norms, softmax and
    activations are a few FLOPs per element and left out, as is usual for a matmul floor.
    """
    vision = cfg["vision_cfg"]
    size, patch, width, layers = vision["image_size"], vision["patch_size"], vision["width"], vision["layers"]
    mlp = round(width * vision.get("mlp_ratio", 4.0))
    patches = (size // patch) ** 2
    tokens = patches + 1
    macs = patches * 3 * patch * patch * width  # conv1
    per_block = tokens * width * 3 * width + tokens * width * width  # QKV, output projection
    per_block += 2 * tokens * tokens * width  # q·kᵀ and attention·v over all heads
    per_block += 2 * tokens * width * mlp  # MLP up and down
    macs += layers * per_block + tokens * width * cfg["embed_dim"]
    return 2.0 * macs


def counted_flops_per_frame(model: LoadedModel, pixels: torch.Tensor, mask: torch.Tensor) -> float:
    """Cross-check with torch's own FLOP counter (matmuls, convolutions and attention only)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    # The fused fast path of nn.MultiheadAttention is one opaque op to the counter: count the unfused path.
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.inference_mode(), counter:
            model.net.encode_video(pixels.to(model.device), mask.to(model.device))
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
    return counter.get_total_flops() / pixels.shape[0] / pixels.shape[1]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GemmRound:
    """One round of the ViT's own linear layers (QKV, output, MLP up, MLP down) at ``rows`` tokens, in ``dtype``."""

    def __init__(self, cfg: dict[str, Any], rows: int, dtype: torch.dtype, device: torch.device) -> None:
        width = cfg["vision_cfg"]["width"]
        mlp = round(width * cfg["vision_cfg"].get("mlp_ratio", 4.0))
        shapes = [(width, 3 * width), (width, width), (width, mlp), (mlp, width)]
        generator = torch.Generator().manual_seed(0)
        self.inputs = [torch.randn(rows, i, generator=generator).to(device, dtype) for i, _ in shapes]
        self.weights = [torch.randn(o, i, generator=generator).to(device, dtype) for i, o in shapes]
        self.flops = sum(2.0 * rows * i * o for i, o in shapes)
        self.device = device
        self()  # warm-up: oneDNN / cuBLAS pick their kernels on the first call

    @torch.inference_mode()
    def __call__(self) -> float:
        """FLOP/s of one round."""
        _synchronize(self.device)
        began = time.perf_counter()
        for x, w in zip(self.inputs, self.weights, strict=True):
            F.linear(x, w)
        _synchronize(self.device)
        return self.flops / (time.perf_counter() - began)


def model_round(model: LoadedModel, pixels: torch.Tensor, mask: torch.Tensor) -> float:
    """Frames/s of one ``encode_pixels`` batch (transfers and the copy back included)."""
    began = time.perf_counter()
    model.encode_pixels(pixels, mask)  # ends with .cpu(): synchronises on CUDA
    return pixels.shape[0] * pixels.shape[1] / (time.perf_counter() - began)


@dataclass(frozen=True)
class GemmWindow:
    """GEMM rounds run back to back for about as long as a model batch takes."""

    rounds: list[float]
    """FLOP/s of each round."""

    @property
    def sustained(self) -> float:
        """FLOP/s over the whole window (rounds are equal work: the harmonic mean)."""
        return len(self.rounds) / sum(1.0 / r for r in self.rounds)

    @property
    def burst(self) -> float:
        return max(self.rounds)


def gemm_window(gemm: GemmRound, seconds: float) -> GemmWindow:
    rounds: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(rounds) < 3:
        rounds.append(gemm())
    return GemmWindow(rounds)


@dataclass(frozen=True)
class PairedRates:
    gemm_flops_per_s: float
    """Median over the windows of their sustained GEMM rate."""
    frames_per_s: float
    ratio: float
    """Median over the batches of (model frames/s) / (frames/s the sustained GEMM rate allows), each batch judged
    against the faster of the two windows beside it."""
    burst_ratio: float
    """The same against the fastest single round of those windows (stricter: a peak no 1-s batch can hold)."""
    gemm_windows: list[list[float]]
    """FLOP/s of every GEMM round, window by window, in the order taken."""
    batches: list[float]
    """Frames/s of each model batch; batch i sat between windows i and i + 1."""


def paired_rates(
    gemm: GemmRound,
    model: LoadedModel,
    pixels: torch.Tensor,
    mask: torch.Tensor,
    flops_per_frame: float,
    seconds: float,
) -> PairedRates:
    """GEMM windows and model batches taken in turns for about ``seconds``, each window as long as a batch.

    The bf16 GEMM rate of the shared test VM swings by 2-3× within seconds (AMX units shared with other guests):
    a floor measured minutes apart from the model made the ratio swing as much, and short rounds catch bursts
    that a batch of a second or more averages away (at one thread in the slow state, 0.1-s rounds ranged
    210-830 GFLOP/s while 1.2-s runs of the same products gave 180-490). Taking them in turns, over equal times,
    puts both under the same conditions; each batch is judged against the faster window beside it, so the floor
    errs towards strict."""
    frames_per_batch = pixels.shape[0] * pixels.shape[1]
    warm_up = model_round(model, pixels, mask)  # also sets the first window's length
    windows = [gemm_window(gemm, frames_per_batch / warm_up)]
    frames: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(frames) < 3:
        frames.append(model_round(model, pixels, mask))
        windows.append(gemm_window(gemm, frames_per_batch / frames[-1]))

    def median_ratio(rate: Callable[[GemmWindow], float]) -> float:
        beside = itertools.pairwise(windows)
        return statistics.median(
            f * flops_per_frame / max(rate(before), rate(after))
            for f, (before, after) in zip(frames, beside, strict=True)
        )

    return PairedRates(
        statistics.median(w.sustained for w in windows),
        statistics.median(frames),
        median_ratio(lambda w: w.sustained),
        median_ratio(lambda w: w.burst),
        [w.rounds for w in windows],
        frames,
    )


# Profiler op names by kind of work, matched against each op's own (self) time so that nested calls count once.
OP_KINDS = {
    "matrix products": ("_linear_pointwise", "aten::mm", "aten::addmm", "aten::bmm", "convolution"),
    "attention": ("scaled_dot_product", "flash_attention", "softmax", "multi_head_attention", "rescale_qkv"),
    "layer norms": ("layer_norm",),
}
OTHER_WORK = "everything else"


def op_kind(name: str) -> str:
    return next((kind for kind, parts in OP_KINDS.items() if any(p in name for p in parts)), OTHER_WORK)


def time_split(model: LoadedModel, pixels: torch.Tensor, mask: torch.Tensor, batches: int = 2) -> dict[str, float]:
    """Seconds per batch by kind of work (CPU only: on CUDA the profiler's CPU times say nothing about kernels)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(batches):
            model.encode_pixels(pixels, mask)
    seconds = dict.fromkeys([*OP_KINDS, OTHER_WORK], 0.0)
    for event in profiler.key_averages():
        seconds[op_kind(event.key)] += event.self_cpu_time_total / 1e6 / batches
    return seconds


@dataclass
class ModelRow:
    name: str
    dtype: str
    measured: PairedRates
    flops_per_frame: float
    used: bool
    """Whether ``choose_precision`` picked this dtype, i.e. whether ``ts2 index`` runs it."""
    split: dict[str, float] = field(default_factory=dict)
    """Seconds per batch by kind of work (``time_split``); empty on CUDA."""
    frames_per_batch: int = 0

    @property
    def frames_per_s(self) -> float:
        return self.measured.frames_per_s

    @property
    def gemm_flops_per_s(self) -> float:
        return self.measured.gemm_flops_per_s

    @property
    def floor_frames_per_s(self) -> float:
        return self.gemm_flops_per_s / self.flops_per_frame

    @property
    def ratio(self) -> float:
        return self.measured.ratio

    @property
    def ratio_cap(self) -> float | None:
        """The ratio a batch would reach if its matrix products ran at the GEMM rate and everything else took
        the time profiled: the most that faster products alone could give."""
        if not self.split:
            return None
        floor = self.frames_per_batch * self.flops_per_frame / self.gemm_flops_per_s
        rest = sum(t for kind, t in self.split.items() if kind != "matrix products")
        return floor / (floor + rest)


def model_vs_floor(models: dict[str, LoadedModel], videos: list[np.ndarray]) -> tuple[list[ModelRow], float]:
    """Rows for each model and dtype it runs in; also the FLOP counter's figure for the zero-shot backbone."""
    first = next(iter(models.values()))
    videos = (videos * MODEL_BATCH[first.device.type])[: MODEL_BATCH[first.device.type]]
    cfg = first.config.backbone_cfg or {}
    analytic = vit_flops_per_frame(cfg)
    pixels, mask = first.video_batch(videos)
    counted = counted_flops_per_frame(first, pixels[:1], mask[:1])
    rows: list[ModelRow] = []
    tokens = pixels.shape[0] * pixels.shape[1] * ((first.image_size // cfg["vision_cfg"]["patch_size"]) ** 2 + 1)
    for name, model in models.items():
        chosen = dataclasses.replace(model, precision_known=False)
        settle_precision(chosen, videos[:2])  # what the indexer would pick; ``model`` itself stays fp32
        # TS2's extra parts (selection, temporal transformer) are counted by the FLOP counter, not by hand.
        flops = analytic if model.config.zero_shot else counted_flops_per_frame(model, pixels[:1], mask[:1])
        for variant in (fp32(model), *reduced_precision(model)):
            dtype = variant.dtype or torch.float32
            measured = paired_rates(
                GemmRound(cfg, tokens, dtype, model.device), variant, pixels, mask, flops, PAIRED_SECONDS
            )
            used = variant.dtype == chosen.dtype
            split = time_split(variant, pixels, mask) if model.device.type == "cpu" else {}
            frames = pixels.shape[0] * pixels.shape[1]
            rows.append(ModelRow(name, dtype_name(variant.dtype), measured, flops, used, split, frames))
            print(
                f"{name} {rows[-1].dtype}: {rows[-1].frames_per_s:.1f} frames/s, {rows[-1].ratio:.0%} of floor",
                file=sys.stderr,
            )
    return rows, counted


# ------------------------------------------------------------------------------------- sweep of choices


@contextmanager
def process_pool() -> Iterator[None]:
    """Decode in worker processes instead of threads (frames come back pickled) for the length of the block."""
    import multiprocessing

    original = indexer.ThreadPoolExecutor

    def make(max_workers: int, thread_name_prefix: str = "") -> ProcessPoolExecutor:
        # forkserver: forking a process whose OpenMP pool is running is not safe
        return ProcessPoolExecutor(max_workers, mp_context=multiprocessing.get_context("forkserver"))

    indexer.ThreadPoolExecutor = make  # type: ignore[assignment]
    try:
        yield
    finally:
        indexer.ThreadPoolExecutor = original  # type: ignore[misc]


@dataclass
class SweepRow:
    label: str
    options: dict[str, Any]
    variant: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext
    timings: list[Timing] = field(default_factory=list)
    summaries: list[IndexSummary] = field(default_factory=list)


def sweep_choices(model: LoadedModel, cores: int) -> list[SweepRow]:
    """The default plan first, then one change at a time: model threads, decode threads, batch size, decoding
    in processes."""
    plan = thread_plan(model.device)
    batch = indexer.default_batch_size(model.device)
    default = (plan.workers, plan.model_workers, plan.torch_threads)
    one_batch = [(plan.workers, 1, 1), (plan.workers, 1, cores)]  # one batch at a time, on 1 or all cores
    decoders = [(1, *default[1:]), (2 * plan.workers, *default[1:])]
    threads = [default, *one_batch, *decoders]
    rows = [_choice(*t, batch) for t in dict.fromkeys(threads)]
    rows += [_choice(*default, b) for b in (batch // 2, batch * 2)]
    rows.append(_choice(*default, batch, "decode in processes", process_pool))
    return rows


def _choice(
    workers: int,
    model_workers: int,
    torch_threads: int,
    batch: int,
    note: str = "",
    variant: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext,
) -> SweepRow:
    label = f"decode {workers}, model {model_workers}×{torch_threads} threads, batch {batch}"
    options = {"workers": workers, "model_workers": model_workers, "torch_threads": torch_threads, "batch_size": batch}
    return SweepRow(label + (f", {note}" if note else ""), options, variant)


def sweep(folder: Path, model: LoadedModel, workdir: Path, repeats: int, rows: list[SweepRow]) -> list[SweepRow]:
    """The indexer under each choice, interleaved so that every choice sees the same load on the machine."""
    for repeat in range(repeats):
        for row in rows:
            with row.variant():
                timing, summary = pipelined_run(folder, model, workdir, **row.options)
            row.timings.append(timing)
            row.summaries.append(summary)
            print(f"{row.label}: {timing.wall_s:.1f} s", file=sys.stderr)
        print(f"sweep repeat {repeat + 1} done", file=sys.stderr)
    return rows


# ---------------------------------------------------------------------------------------------- report


def _median_shares(summaries: list[IndexSummary]) -> dict[str, float]:
    keys = summaries[0].pipeline.shares().keys()
    return {k: statistics.median(s.pipeline.shares()[k] for s in summaries) for k in keys}


def _median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def report_comparison(result: Comparison, device: str) -> list[str]:
    n = result.videos
    seq_wall, seq_cpu = _median(t.wall_s for t in result.sequential), _median(t.cpu_s for t in result.sequential)
    pipe_wall, pipe_cpu = _median(t.wall_s for t in result.pipelined), _median(t.cpu_s for t in result.pipelined)
    stats = result.summaries[0].pipeline
    plan = f"decode {stats.workers}, model {stats.model_workers}×{stats.torch_threads} threads"
    ratios = ", ".join(f"{r:.2f}" for r in result.ratios)
    return [
        f"#### 1. Videos/s: pipelined indexer vs sequential loop ({device}, {n} videos)",
        "",
        "| indexer | median wall s | videos/s | CPU-s per video |",
        "|---|---:|---:|---:|",
        f"| sequential loop: fp32, torch's default threads, one video at a time | {seq_wall:.1f} "
        f"| {n / seq_wall:.2f} | {seq_cpu / n:.2f} |",
        f"| `index_folders`: {plan}, batch {stats.batch_size}, {result.dtype} | {pipe_wall:.1f} "
        f"| {n / pipe_wall:.2f} | {pipe_cpu / n:.2f} |",
        "",
        f"Speed-up: **{statistics.median(result.ratios):.2f}×** (median of the per-repeat ratios {ratios}; each "
        "repeat runs the loop and then the indexer, so both see about the same load from other programs).",
    ]


def report_shares(result: Comparison, device: str) -> list[str]:
    lines = [
        f"#### 3. Where the pipelined indexer's time goes ({device})",
        "",
        "| repeat | decode → embed wall s | decode busy, worker-s | model busy, worker-s | model idle "
        "| decoders idle | bottleneck |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for i, summary in enumerate(result.summaries, 1):
        stats, shares = summary.pipeline, summary.pipeline.shares()
        lines.append(
            f"| {i} | {stats.wall_seconds:.1f} | {stats.decode_seconds:.1f} | {stats.infer_seconds:.1f} "
            f"| {shares['model_idle']:.0%} | {shares['decode_idle']:.0%} | {stats.bottleneck()} |"
        )
    return lines


def report_models(rows: list[ModelRow], counted: float, threads: int, device: str) -> list[str]:
    analytic = next((r.flops_per_frame for r in rows if r.name == BACKBONE), counted)
    batch = MODEL_BATCH["cuda" if device == "GPU" else "cpu"]
    lines = [
        f"#### 2. Model throughput vs the arithmetic floor ({device}, {threads} torch thread(s), "
        f"{batch} videos × 12 frames per forward)",
        "",
        f"FLOPs per 224² frame, ViT-B/32 as ts2 runs it: {analytic / 1e9:.2f} G counted from the config "
        f"(torch's FlopCounterMode: {counted / 1e9:.2f} G).",
        "",
        "GEMM windows (rounds of the ViT's four products run back to back for as long as a model batch takes) "
        "and model batches were taken in turns; GEMM GFLOP/s (sustained over a window), floor and measured "
        "frames/s are medians over the run; ratio is the median of each batch against the faster window beside "
        "it, and the last column the same against the fastest single round of those windows.",
        "",
        "| model | dtype | GFLOPs/frame | GEMM GFLOP/s | floor frames/s | measured frames/s | ratio "
        "| vs burst rounds |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        dtype = f"{r.dtype} (chosen)" if r.used else r.dtype
        lines.append(
            f"| {r.name} | {dtype} | {r.flops_per_frame / 1e9:.2f} | {r.gemm_flops_per_s / 1e9:.0f} "
            f"| {r.floor_frames_per_s:.1f} | {r.frames_per_s:.1f} | {r.ratio:.0%} "
            f"| {r.measured.burst_ratio:.0%} |"
        )
    lines += report_split(rows)
    by_key = {(r.name, r.dtype): r for r in rows}
    lines.append("")
    for dtype in dict.fromkeys(r.dtype for r in rows):
        backbone, ts2 = by_key.get((BACKBONE, dtype)), by_key.get((TS2, dtype))
        if backbone and ts2:
            overhead = backbone.frames_per_s / ts2.frames_per_s - 1
            lines.append(f"TS2-Net forward, {dtype}: {overhead:+.0%} time per frame over the plain backbone.")
    return lines


def report_split(rows: list[ModelRow]) -> list[str]:
    rows = [r for r in rows if r.split]
    if not rows:
        return []
    kinds = [*OP_KINDS, OTHER_WORK]
    lines = [
        "",
        "Where a batch's time goes (torch profiler, own time of each op, ms per batch, after the batches above); "
        "cap: the ratio if the matrix products ran at the GEMM rate above and the rest took what it took here "
        "(the packed bf16 products include the MLP's activation, fused into them, so its cap is generous).",
        "",
        f"| model | dtype | {' | '.join(kinds)} | cap |",
        "|---|---|" + "---:|" * (len(kinds) + 1),
    ]
    for r in rows:
        cells = " | ".join(f"{r.split[k] * 1e3:.0f}" for k in kinds)
        lines.append(f"| {r.name} | {r.dtype} | {cells} | {r.ratio_cap:.0%} |")
    return lines


def report_sweep(rows: list[SweepRow], videos: int) -> list[str]:
    lines = [
        "#### Sweep: decode threads, model workers × torch threads, batch size, processes (CPU)",
        "",
        "| choice | median wall s | videos/s | all runs, s | CPU-s per video | model idle | decoders idle |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for row in rows:
        seconds = _median(t.wall_s for t in row.timings)
        cpu = _median(t.cpu_s for t in row.timings)
        shares = _median_shares(row.summaries)
        runs = ", ".join(f"{t.wall_s:.1f}" for t in row.timings)
        # A process pool's decoding is not in this process's CPU time.
        cpu_text = "n/a" if row.variant is process_pool else f"{cpu / videos:.2f}"
        lines.append(
            f"| {row.label} | {seconds:.1f} | {videos / seconds:.2f} | {runs} | {cpu_text} "
            f"| {shares['model_idle']:.0%} | {shares['decode_idle']:.0%} |"
        )
    return lines


def report_gpu(result: Comparison | None) -> list[str]:
    lines = ["#### 4. GPU", ""]
    if result is None:
        return [*lines, "No CUDA GPU was available on this machine: nothing measured on a GPU."]
    stats = result.summaries[0].pipeline
    shares = _median_shares(result.summaries)
    videos_per_s = result.videos / _median(t.wall_s for t in result.pipelined)
    return [
        *lines,
        f"{torch.cuda.get_device_name(0)}, ViT-B-32 {result.dtype}: **{videos_per_s:.2f} videos/s** with "
        f"{stats.workers} decode workers, batch {stats.batch_size}. The model idled {shares['model_idle']:.0%} "
        f"of the time and the decoders {shares['decode_idle']:.0%}: the bottleneck is **{stats.bottleneck()}**.",
    ]


# ------------------------------------------------------------------------------------------------ main


@dataclass
class DeviceResult:
    comparison: Comparison
    rows: list[ModelRow]
    flops_counted: float
    torch_threads: int

    def sections(self, device: str) -> list[list[str]]:
        return [
            report_comparison(self.comparison, device),
            report_models(self.rows, self.flops_counted, self.torch_threads, device),
            report_shares(self.comparison, device),
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "comparison": dataclasses.asdict(self.comparison) | {"ratios": self.comparison.ratios},
            "models": [dataclasses.asdict(r) | {"ratio": r.ratio, "ratio_cap": r.ratio_cap} for r in self.rows],
            "flops_counted": self.flops_counted,
        }


def run_device(
    model: LoadedModel, folder: Path, weights: Path, workdir: Path, repeats: int, videos: list[np.ndarray]
) -> DeviceResult:
    """Sections 1-3 on the model's device: indexer vs loop, model vs floor, time shares."""
    baseline = fp32(model)
    indexed = dataclasses.replace(model)
    settle_precision(indexed, videos[:2])
    print(f"{model.device}: the indexer runs the model in {dtype_name(indexed.dtype)}", file=sys.stderr)
    comparison = compare_indexers(folder, indexed, baseline, workdir, repeats)
    plan = thread_plan(model.device)
    models = {BACKBONE: baseline, TS2: fp32(load(weights, str(model.device), trainable=True))}
    with indexer._torch_threads(plan.torch_threads):  # the thread count the indexer runs the model with
        rows, counted = model_vs_floor(models, videos)
    return DeviceResult(comparison, rows, counted, plan.torch_threads)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "ts2-index-bench")
    parser.add_argument("--quick", action="store_true", help="fewer, shorter videos and one repeat")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=None, help="indexer repeats (default 3, quick 1)")
    parser.add_argument("--sweep", action="store_true", help="also time thread, batch and pool choices (CPU)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available")
    use_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.workdir.mkdir(parents=True, exist_ok=True)

    folder = prepare_videos(args.workdir, args.quick)
    weights = prepare_weights(args.workdir)
    paths = sorted(folder.iterdir())
    # Decoding every video once also brings the files into the page cache before anything is timed.
    videos = [sample_frames(p).frames for p in paths]
    print(f"{len(paths)} videos, {available_cores()} cores", file=sys.stderr)

    model = load(weights, "cpu")
    cpu = run_device(model, folder, weights, args.workdir, repeats, videos)
    sections, raw = cpu.sections("CPU"), {"cpu": cpu.to_json()}
    gpu: DeviceResult | None = None
    if use_gpu:
        gpu = run_device(load(weights, "cuda"), folder, weights, args.workdir, repeats, videos)
        sections += gpu.sections("GPU")
        raw["gpu"] = gpu.to_json()
    sections.append(report_gpu(gpu.comparison if gpu else None))
    if args.sweep:
        settle_precision(model, videos[:2])
        rows = sweep(folder, model, args.workdir, repeats, sweep_choices(model, available_cores()))
        sections.append(report_sweep(rows, len(paths)))
        raw["sweep"] = [{"label": r.label, "timings": [dataclasses.asdict(t) for t in r.timings]} for r in rows]
    print("\n\n".join("\n".join(lines) for lines in sections))
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1, default=str))


if __name__ == "__main__":
    main()
