"""Measure ``ts2 search``: query latency (text encoding, ANN, re-rank), recall@10 and cold start.

Run ``python benchmarks/search_bench.py`` from the repository root (``--videos 20000`` for a quick run).

Two synthetic libraries of ``--videos`` videos are written through the real store (``ts2cli.store``), once, into
``--workdir`` (default: a folder in the system temp folder), and reused while their parameters match:

- clustered: frames = cluster centre + per-video offset + per-frame noise, normalised (real embeddings are
  clustered, and the frames of one video are correlated); queries are drawn near a random cluster centre;
- uniform: independent random unit frames and random unit queries, the worst case for any ANN index.

Text encoding is timed on a real ViT-B-32 text tower with random weights, read from a local ``.safetensors`` file
that is made once with open_clip; random weights cost the same time as trained ones but give meaningless vectors,
so ANN and re-rank are timed with the synthetic query vectors instead. Recall@10 compares the top 10 of
``ts2cli.search.rank`` with exact TS2 scoring of every video (cached in ``--workdir`` too). The cold ``ts2 search``
runs in fresh processes on the clustered library, whose recorded model is that weights file, with compiled modules
cached under ``--workdir`` as in any installation; a helper process repeats its steps to time each phase, and
``python -c`` probes price the imports. Prints markdown tables (``--json`` keeps every measurement).

The first run writes the libraries (about 2 and 5 minutes at 100k videos on 2 cores); later runs take about
10 minutes on a busy 2-core machine, mostly the cold start processes (``--cold-runs 0`` skips them).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as `ts2 search` runs numpy (see ts2cli/cli.py)

import numpy as np
import torch

from ts2cli.errors import LibraryError
from ts2cli.indexer import global_vector
from ts2cli.model import ModelOptions, frame_weighted_similarity, load_model
from ts2cli.query import TextModel, load_library_model, text_query
from ts2cli.search import SearchOptions, library_eps, matching_moment, rank, score_candidates
from ts2cli.store import Library
from ts2cli.text_encoder import load_text_encoder

REPO = Path(__file__).resolve().parents[1]
MSRVTT_CAPTIONS = REPO.parent / "shared" / "msrvtt" / "MSRVTT_JSFUSION_test.csv"
FALLBACK_SENTENCES = (
    "a dog catches a frisbee in the park",
    "a man is cooking pasta in a small kitchen",
    "two children ride bicycles down a hill",
    "a woman sings on stage while the crowd cheers",
    "cars drive through a city street at night",
    "a cat jumps onto a table and knocks over a glass",
    "people are dancing at a wedding",
    "a person explains how to fix a bicycle tyre",
)
WEIGHTS_FILE = "vit-b-32-quickgelu-random.safetensors"
BACKBONE = "ViT-B-32"
LIMIT = 10
SCORE_TOLERANCE = 1e-5  # exact scores closer than this to the 10th best count as ties
WRITE_CHUNK = 1000  # videos generated and committed at a time
EXACT_CHUNK = 4096  # videos scored exactly at a time for the ground truth

Kind = Literal["clustered", "uniform"]


# ---------------------------------------------------------------------- synthetic data


@dataclass(frozen=True)
class DataParams:
    kind: Kind
    videos: int
    dim: int
    frames: int
    clusters: int
    video_spread: float
    """Norm of the per-video offset from its cluster centre (the centre has norm 1)."""
    frame_noise: float
    """Norm of the per-frame noise added to the video's base vector."""
    seed: int

    @property
    def name(self) -> str:
        shape = f"n{self.videos}-d{self.dim}-t{self.frames}-s{self.seed}"
        if self.kind == "uniform":
            return f"uniform-{shape}"
        return f"clustered-{shape}-c{self.clusters}-v{self.video_spread:g}-f{self.frame_noise:g}"


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _gaussian(rng: np.random.Generator, shape: tuple[int, ...], norm: float) -> np.ndarray:
    """Isotropic noise whose vectors (last axis) have expected norm ``norm``."""
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(norm / math.sqrt(shape[-1]))


def cluster_centres(params: DataParams) -> np.ndarray:
    rng = np.random.default_rng([params.seed, 0])
    return _unit_rows(rng.standard_normal((params.clusters, params.dim), dtype=np.float32))


def video_chunks(params: DataParams) -> Iterator[np.ndarray]:
    """(n, T, D) float32 unit frame features, ``WRITE_CHUNK`` videos at a time, deterministic for ``params``."""
    rng = np.random.default_rng([params.seed, 1])
    centres = cluster_centres(params) if params.kind == "clustered" else None
    for start in range(0, params.videos, WRITE_CHUNK):
        n = min(WRITE_CHUNK, params.videos - start)
        shape = (n, params.frames, params.dim)
        if centres is None:
            yield _unit_rows(rng.standard_normal(shape, dtype=np.float32))
            continue
        base = centres[rng.integers(len(centres), size=n)] + _gaussian(rng, (n, params.dim), params.video_spread)
        yield _unit_rows(base[:, None, :] + _gaussian(rng, shape, params.frame_noise))


def query_vectors(params: DataParams, count: int, noise: float) -> np.ndarray:
    """(count, D) unit query vectors: a random cluster centre plus noise of norm ``noise``, or uniform."""
    rng = np.random.default_rng([params.seed, 2])
    if params.kind == "uniform":
        return _unit_rows(rng.standard_normal((count, params.dim), dtype=np.float32))
    centres = cluster_centres(params)
    picked = centres[rng.integers(len(centres), size=count)]
    return _unit_rows(picked + _gaussian(rng, (count, params.dim), noise))


def ensure_library(workdir: Path, params: DataParams, identity: dict[str, Any]) -> Path:
    """The library for ``params`` under ``workdir``, written through the real store unless already there."""
    directory = workdir / params.name
    marker = workdir / f"{params.name}.json"
    if directory.is_dir() and marker.is_file() and json.loads(marker.read_text()) == asdict(params):
        try:
            with Library.open(directory, write=True) as library:
                library.check_model(identity)  # same model: only records where its weights are now
                if library.count_ok() == params.videos:
                    return directory
        except LibraryError as exc:
            log(f"rebuilding {params.name}: {exc}")
    marker.unlink(missing_ok=True)
    shutil.rmtree(directory, ignore_errors=True)
    for stale in workdir.glob(f"{params.name}.truth-*.npz"):
        stale.unlink()
    unfinished = workdir / f"{params.name}.partial"
    shutil.rmtree(unfinished, ignore_errors=True)
    began = time.perf_counter()
    times = [i + 0.5 for i in range(params.frames)]
    written = 0
    with Library.open(unfinished, write=True, create=True) as library:
        library.check_model(identity)
        for chunk in video_chunks(params):
            for frames in chunk:
                library.put_video(
                    f"/bench/{params.kind}/{written // 1000:03d}/video{written:06d}.mp4",
                    size=1_000_000 + written,
                    mtime=1.7e9 + written,
                    fingerprint=f"{written:016x}",
                    duration=float(params.frames),
                    width=640,
                    height=360,
                    frame_times=times,
                    frames=frames,
                    global_vector=global_vector(frames),
                )
                written += 1
            library.commit()
            if written % (20 * WRITE_CHUNK) == 0:
                log(f"{params.name}: {written} videos written, {time.perf_counter() - began:.0f} s")
        library.save_ann()
    unfinished.rename(directory)
    marker.write_text(json.dumps(asdict(params)))
    log(f"{params.name}: written in {time.perf_counter() - began:.0f} s")
    return directory


# ---------------------------------------------------------------------- model


def ensure_weights(workdir: Path) -> Path:
    """A ViT-B-32 (QuickGELU) state dict with open_clip's random initialisation, made once in a subprocess."""
    path = workdir / WEIGHTS_FILE
    if path.is_file():
        return path
    unfinished = path.with_suffix(".partial")
    script = (
        "import sys, open_clip, safetensors.torch\n"
        "model = open_clip.create_model('ViT-B-32-quickgelu')\n"
        "state = {k: v.contiguous() for k, v in model.state_dict().items()}\n"
        "safetensors.torch.save_file(state, sys.argv[1])\n"
    )
    log("creating the random ViT-B-32 weights file (once)")
    subprocess.run([sys.executable, "-c", script, str(unfinished)], check=True)
    unfinished.rename(path)
    return path


def model_options(weights: Path) -> ModelOptions:
    return ModelOptions(model=BACKBONE, pretrained=str(weights), device="cpu")


def synthetic_identity(dim: int) -> dict[str, Any]:
    """Model config for libraries whose dimension is not the text model's (no cold start test then)."""
    return {"backbone": "synthetic", "mode": "zero-shot", "compat": "fixed", "frames": 12, "embed_dim": dim}


def sentences(count: int) -> list[str]:
    found: list[str] = []
    if MSRVTT_CAPTIONS.is_file():
        with MSRVTT_CAPTIONS.open(newline="", encoding="utf-8") as f:
            found = [row["sentence"] for row in csv.DictReader(f)]
    pool = found or list(FALLBACK_SENTENCES)
    return [pool[i % len(pool)] for i in range(count)]


# ---------------------------------------------------------------------- measurements


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    began = time.perf_counter()
    result = fn()
    return time.perf_counter() - began, result


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def p90(values: Sequence[float]) -> float:
    return float(np.percentile(values, 90)) if values else math.nan


def ms(values: Sequence[float]) -> str:
    return f"{median(values) * 1e3:.1f} / {p90(values) * 1e3:.1f}"


@dataclass
class TextEncoderTiming:
    """One way of encoding a query, timed on the same texts as the others, and its distance to fp32 torch."""

    name: str
    seconds: list[float]
    min_cosine: float
    """Lowest cosine, over the texts, between its query vector and the fp32 torch model's."""


def compare_text_encoders(encoders: dict[str, TextModel], count: int) -> list[TextEncoderTiming]:
    """Each encoder on the same texts, taking turns text by text (so that load from other programs spreads
    evenly); the last entry is the fp32 reference."""
    texts = sentences(count + 3)
    for text in texts[:3]:  # first calls build the tokenizer and warm up the kernels
        for encoder in encoders.values():
            text_query(encoder, text)
    seconds: dict[str, list[float]] = {name: [] for name in encoders}
    vectors: dict[str, list[np.ndarray]] = {name: [] for name in encoders}
    names = list(encoders)
    for i, text in enumerate(texts[3:]):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            taken, (vector, _) = timed(partial(text_query, encoders[name], text))
            seconds[name].append(taken)
            vectors[name].append(vector / np.linalg.norm(vector))
    reference = np.stack(vectors[names[-1]])
    return [
        TextEncoderTiming(name, seconds[name], float((np.stack(vectors[name]) * reference).sum(-1).min()))
        for name in names
    ]


@dataclass
class GroundTruth:
    ids: np.ndarray
    """(N,) video ids, ascending."""
    scores: np.ndarray
    """(Q, N) exact TS2 score of every query against every video."""
    vectors: np.ndarray
    """(N, D) global (ANN) vectors, rows matching ``ids``."""

    def column(self, video_ids: Sequence[int]) -> np.ndarray:
        return np.searchsorted(self.ids, np.asarray(video_ids, dtype=np.int64))

    def recall_at_10(self, query: int, video_ids: Sequence[int]) -> float:
        """Share of the exact top 10 found; a video scoring within SCORE_TOLERANCE of the 10th best counts."""
        row = self.scores[query]
        tenth = np.partition(row, -LIMIT)[-LIMIT]
        found = row[self.column(video_ids[:LIMIT])]
        return float(np.count_nonzero(found >= tenth - SCORE_TOLERANCE)) / LIMIT


def ground_truth(library: Library, queries: np.ndarray, eps: float | None, cache: Path) -> GroundTruth:
    """Exact scores of every video, from ``cache`` when it holds them for these queries and this library."""
    global_ids, vectors = library.global_vectors()
    if cache.is_file():
        with np.load(cache) as saved:
            if np.array_equal(saved["ids"], global_ids) and np.array_equal(saved["queries"], queries):
                return GroundTruth(ids=global_ids, scores=saved["scores"], vectors=vectors)
    seconds, (ids, scores) = timed(lambda: exact_scores(library, queries, eps))
    log(f"exact TS2 scores of {len(ids)} videos x {len(queries)} queries in {seconds:.0f} s")
    if not np.array_equal(ids, global_ids):
        raise RuntimeError("the library changed while the ground truth was computed")
    np.savez(cache, ids=ids, queries=queries, scores=scores)
    return GroundTruth(ids=ids, scores=scores, vectors=vectors)


def exact_scores(library: Library, queries: np.ndarray, eps: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(ids (N,), scores (Q, N)): every video scored with the function ``rank`` uses, all queries at once."""
    text = torch.from_numpy(queries)
    ids: list[int] = []
    parts: list[np.ndarray] = []
    batch: list[np.ndarray] = []

    def flush() -> None:
        frames = max(v.shape[0] for v in batch)
        padded = np.zeros((len(batch), frames, batch[0].shape[1]), dtype=np.float32)
        mask = np.zeros((len(batch), frames), dtype=np.int64)
        for i, video in enumerate(batch):
            padded[i, : len(video)] = video
            mask[i, : len(video)] = 1
        scores, _ = frame_weighted_similarity(text, torch.from_numpy(padded), torch.from_numpy(mask), eps=eps)
        parts.append(scores.numpy())
        batch.clear()

    for video_id, frames in library.iter_frame_features():
        ids.append(video_id)
        batch.append(frames)
        if len(batch) == EXACT_CHUNK:
            flush()
    if batch:
        flush()
    return np.asarray(ids, dtype=np.int64), np.concatenate(parts, axis=1)


def brute_force_top(vectors: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    """Row indices of the ``k`` largest inner products, best first: exact stage 1 without an index."""
    sims = vectors @ query
    top = np.argpartition(sims, -k)[-k:]
    return top[np.argsort(-sims[top])]


@dataclass
class StageTimes:
    """Per-query seconds of each step of ``rank`` (mirrored here, so that each can be timed)."""

    ann: list[float] = field(default_factory=list)
    score: list[float] = field(default_factory=list)
    """``score_candidates``: reading the candidates' features, overlapped with scoring them."""
    rows: list[float] = field(default_factory=list)
    sql: list[float] = field(default_factory=list)
    """Reading the candidates' features alone (not a step: a share of ``score``)."""
    rank: list[float] = field(default_factory=list)
    """The real ``rank`` end to end (a separate pass)."""
    brute_force: list[float] = field(default_factory=list)

    @property
    def rerank(self) -> list[float]:
        return [a + b for a, b in zip(self.score, self.rows, strict=True)]


@dataclass
class CandidateResult:
    candidates: int
    times: StageTimes
    ann_recall: float
    """Mean share of the exact top-``candidates`` by global vector that the ANN index returned."""
    recall: float
    """Mean recall@10 of ``rank`` against exact TS2 scoring of every video."""
    oracle_recall: float
    """Mean recall@10 with an exact stage 1 (brute force over global vectors): what the ANN index can reach."""
    min_recall: float


def mirror_rank(library: Library, query: np.ndarray, k: int, eps: float | None, times: StageTimes) -> np.ndarray:
    """The steps of ``rank`` one by one, and reading the candidates' features alone; returns the ANN candidates."""
    t0 = time.perf_counter()
    found, _ = library.knn(query, k)
    t1 = time.perf_counter()
    ids, scores, weights = score_candidates(library, query, found.tolist(), eps=eps)
    t2 = time.perf_counter()
    order = np.argsort(-scores, kind="stable")[:LIMIT]
    rows = library.videos([ids[i] for i in order])
    for position in order:
        row = rows[ids[position]]
        matching_moment(row.frame_times, weights[position][: len(row.frame_times)], row.duration)
    t3 = time.perf_counter()
    library.frame_features(found.tolist(), dtype=np.float16)  # not a step of rank: what SQLite alone takes
    t4 = time.perf_counter()
    buckets = (times.ann, times.score, times.rows, times.sql)
    for bucket, seconds in zip(buckets, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
        bucket.append(seconds)
    return found


def measure_candidates(
    library: Library, truth: GroundTruth, queries: np.ndarray, k: int, eps: float | None
) -> CandidateResult:
    times = StageTimes()
    options = SearchOptions(limit=LIMIT, candidates=k)
    recalls, ann_recalls, oracle_recalls = [], [], []
    for q, query in enumerate(queries):
        search = partial(rank, library, query, options, eps=eps)
        seconds, hits = timed(search)
        times.rank.append(seconds)
        recalls.append(truth.recall_at_10(q, [hit.video_id for hit in hits]))
    for q, query in enumerate(queries):
        found = mirror_rank(library, query, k, eps, times)
        seconds, exact_top = timed(partial(brute_force_top, truth.vectors, query, k))
        times.brute_force.append(seconds)
        ann_recalls.append(len(set(found.tolist()) & set(truth.ids[exact_top].tolist())) / k)
        best = exact_top[np.argsort(-truth.scores[q, exact_top], kind="stable")[:LIMIT]]
        oracle_recalls.append(truth.recall_at_10(q, truth.ids[best].tolist()))
    return CandidateResult(
        candidates=k,
        times=times,
        ann_recall=float(np.mean(ann_recalls)),
        recall=float(np.mean(recalls)),
        oracle_recall=float(np.mean(oracle_recalls)),
        min_recall=float(np.min(recalls)),
    )


# ---------------------------------------------------------------------- cold start

# Runs what `ts2 search QUERY --library DIR --json` runs, in order, timing each phase (JSON on stdout): the
# library's ONNX text encoder, no torch. load_text_encoder starts building the tokenizer on a thread of its own;
# "tokenizer wait" is what is left of that build afterwards, timed apart from the first encoding.
COLD_HELPER = """
import time
started = time.time()
import json, sys
began = time.perf_counter()
import ts2cli.cli
from ts2cli.report import search_json
from ts2cli.search import SearchOptions, library_eps, rank, require_searchable
from ts2cli.store import Library
from ts2cli.query import text_query
from ts2cli.text_encoder import load_text_encoder
from ts2cli import tokenizer
imported = time.perf_counter()
library = Library.open(sys.argv[1])
require_searchable(library)
opened = time.perf_counter()
model = load_text_encoder(library)
assert model is not None, "the library has no text encoder export"
loaded = time.perf_counter()
tokenizer.encode([sys.argv[2]], model.words)
tokenized = time.perf_counter()
vector, _ = text_query(model, sys.argv[2])
encoded = time.perf_counter()
library.ann()
ann_loaded = time.perf_counter()
hits = rank(library, vector, SearchOptions(), eps=library_eps(library))
json.dumps(search_json(sys.argv[2], model.identity, hits))
ranked = time.perf_counter()
heavy = ("torch", "open_clip", "torchvision", "av")
print(json.dumps({
    "imports": imported - began, "library open": opened - imported, "text encoder load": loaded - opened,
    "tokenizer wait": tokenized - loaded, "text encoding": encoded - tokenized, "ANN index load": ann_loaded - encoded,
    "rank": ranked - ann_loaded, "modules": [m for m in heavy if m in sys.modules],
    "started": started, "ended": time.time(),
}))
"""
COLD_PHASES = (
    "interpreter start",
    "imports",
    "library open",
    "text encoder load",
    "tokenizer wait",
    "text encoding",
    "ANN index load",
    "rank",
    "interpreter exit",
)

# (label, code) run with `python -c`, PROBE_RUNS times at most; each figure is the wall time of a fresh process.
PROBE_RUNS = 3
IMPORT_PROBES = (
    ("python -c pass", "pass"),
    ("import numpy", "import numpy"),
    ("import torch", "import torch"),
    ("import torch, open_clip", "import torch, open_clip"),
    ("import torch, torchvision", "import torch, torchvision"),
    ("import av", "import av"),
    ("import onnxruntime", "import onnxruntime"),
    ("import ts2cli.cli (typer, rich)", "import ts2cli.cli"),
)
IMPORTTIME_MODULES = (
    "ts2cli.cli",
    "typer",
    "rich.console",
    "numpy",
    "torch",
    "hnswlib",
    "av",
    "ts2cli.decode",
    "ts2cli.model",
    "safetensors",
    "onnxruntime",
    "open_clip",
    "torchvision",
    "torch._dynamo",
    "timm",
    "sympy",
)


@dataclass
class ColdResult:
    wall: list[float] = field(default_factory=list)
    """`ts2 search` end to end, per run (the ONNX text encoder: what a user's search runs)."""
    wall_torch: list[float] = field(default_factory=list)
    """`ts2 search --model ... --pretrained ...`, which loads the text tower with torch."""
    wall_without_bytecode: list[float] = field(default_factory=list)
    """The same as ``wall`` with PYTHONDONTWRITEBYTECODE set (when it is set here): ts2cli compiled each time."""
    phases: dict[str, list[float]] = field(default_factory=dict)
    helper_wall: list[float] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)
    probes: dict[str, list[float]] = field(default_factory=dict)
    importtime: dict[str, float] = field(default_factory=dict)
    """Cumulative import seconds of key modules (python -X importtime, one run of the helper)."""


def search_command() -> list[str]:
    """The ``ts2`` console script of this interpreter (not a wrapper such as a pyenv shim found on PATH)."""
    script = Path(sys.executable).parent / "ts2"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "ts2cli"]


def run_timed(command: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} ... failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return seconds, done.stdout


def parse_importtime(stderr: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for line in stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s*(\S+)$", line)
        if match and match.group(2) in IMPORTTIME_MODULES:
            found[match.group(2)] = int(match.group(1)) / 1e6
    return found


def bytecode_env(workdir: Path) -> dict[str, str]:
    """The environment with compiled modules cached (in ``workdir``), as in any normal installation."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(workdir / "pycache")
    return env


def run_helper(helper: list[str], env: dict[str, str]) -> tuple[float, dict[str, Any]]:
    spawned = time.time()
    seconds, out = run_timed(helper, env)
    exited = time.time()
    phases = json.loads(out.strip().splitlines()[-1])
    phases["interpreter start"] = phases["started"] - spawned
    phases["interpreter exit"] = exited - phases["ended"]
    return seconds, phases


def measure_cold(library: Path, query: str, runs: int, workdir: Path, weights: Path) -> ColdResult:
    result = ColdResult(phases={p: [] for p in COLD_PHASES}, probes={label: [] for label, _ in IMPORT_PROBES})
    search = [*search_command(), "search", query, "--library", str(library), "--json"]
    search_torch = [*search, "--model", BACKBONE, "--pretrained", str(weights), "--device", "cpu"]
    helper = [sys.executable, "-c", COLD_HELPER, str(library), query]
    probes = [(label, [sys.executable, "-c", code]) for label, code in IMPORT_PROBES]
    env = bytecode_env(workdir)
    without_bytecode = bool(os.environ.get("PYTHONDONTWRITEBYTECODE"))
    # Warm up: writes the library's text encoder export (a first search through torch does), fills the bytecode
    # cache and the page cache (weights, database, ANN index, libraries).
    for command in (search_torch, search, helper, *(c for _, c in probes)):
        run_timed(command, env)
    for run in range(runs):  # interleaved, so that load from other processes spreads over every figure
        result.wall.append(run_timed(search, env)[0])
        result.wall_torch.append(run_timed(search_torch, env)[0])
        if without_bytecode:
            result.wall_without_bytecode.append(run_timed(search)[0])
        seconds, measured = run_helper(helper, env)
        result.helper_wall.append(seconds)
        for phase in COLD_PHASES:
            result.phases[phase].append(measured[phase])
        result.modules = measured["modules"]
        if run < PROBE_RUNS:
            for label, command in probes:
                result.probes[label].append(run_timed(command, env)[0])
        log(f"cold run {run + 1}/{runs}: ts2 search {result.wall[-1]:.2f} s, torch {result.wall_torch[-1]:.2f} s")
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *helper[1:]], capture_output=True, text=True, env=env, check=True
    )
    result.importtime = parse_importtime(done.stderr)
    return result


# ---------------------------------------------------------------------- report


def seconds_cell(values: Sequence[float]) -> str:
    return f"{median(values):.3f} | {min(values):.3f}"


def default_candidates(args: argparse.Namespace) -> int:
    """What the tables focus on: ts2 search's default when measured."""
    return SearchOptions().candidates if SearchOptions().candidates in args.candidates else args.candidates[0]


def print_report(args: argparse.Namespace, run: RunResult) -> None:
    default = default_candidates(args)
    text = run.text_encoding
    print(
        f"\n## Search benchmark: {args.videos} videos x {args.frames} frames x {args.dim}-d, {args.queries} query "
        f"vectors, {args.text_queries} query texts; {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, "
        f"load average {run.load_before:.1f} before and {os.getloadavg()[0]:.1f} after\n"
    )
    print(f"### Query latency after model load (ms, median / p90; {default} candidates)\n")
    print("| data | text encoding | ANN | re-rank | total | brute force | ANN / brute force |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind, rows in run.results.items():
        t = next(r for r in rows if r.candidates == default).times
        total = [a + b for a, b in zip(text, t.rank, strict=False)]
        print(
            f"| {kind} | {ms(text)} | {ms(t.ann)} | {ms(t.rerank)} | {ms(total)} | {ms(t.brute_force)} "
            f"| {median(t.ann) / median(t.brute_force):.2f} |"
        )
    print(
        "\ntotal = text encoding + `rank()` (ANN + re-rank as `ts2 search` runs them), paired by query index; "
        "re-rank = read + score (SQL reads overlapped with the fp16 to fp32 cast and scoring) + rows below; "
        "brute force = inner products with all global vectors + top-k."
    )
    print("\n### Steps and recall by number of candidates (ms, median / p90)\n")
    print(
        "| data | candidates | ANN | read + score | rows | `rank()` | SQL alone | brute force "
        "| ANN recall@k | recall@10 | recall@10, exact stage 1 | worst query |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind, rows in run.results.items():
        for r in rows:
            t = r.times
            print(
                f"| {kind} | {r.candidates} | {ms(t.ann)} | {ms(t.score)} | {ms(t.rows)} | {ms(t.rank)} "
                f"| {ms(t.sql)} | {ms(t.brute_force)} | {r.ann_recall:.3f} | {r.recall:.3f} "
                f"| {r.oracle_recall:.3f} | {r.min_recall:.1f} |"
            )
    if run.text_encoders:
        print(f"\n### Text encoding (ms, median / p90, {len(run.text_encoders[0].seconds)} texts, taking turns)\n")
        print("| encoder | time | lowest cosine to fp32 torch |")
        print("|---|---:|---:|")
        for timing in run.text_encoders:
            print(f"| {timing.name} | {ms(timing.seconds)} | {timing.min_cosine:.6f} |")
    if run.cold is not None:
        print_cold(run.cold)


def print_cold(cold: ColdResult) -> None:
    print(f"\n### Cold `ts2 search` (s, {len(cold.wall)} fresh processes)\n")
    print("| phase | median | min |")
    print("|---|---:|---:|")
    for phase in COLD_PHASES:
        print(f"| {phase} | {seconds_cell(cold.phases[phase])} |")
    print(f"| **all of the above (one process)** | {seconds_cell(cold.helper_wall)} |")
    print(f"| **`ts2 search --json` wall time** | {seconds_cell(cold.wall)} |")
    label = "`ts2 search --json --model ... --pretrained ...` (text tower through torch)"
    print(f"| {label} | {seconds_cell(cold.wall_torch)} |")
    if cold.wall_without_bytecode:
        label = "`ts2 search --json`, no bytecode cache (PYTHONDONTWRITEBYTECODE=1)"
        print(f"| {label} | {seconds_cell(cold.wall_without_bytecode)} |")
    print(f"\nHeavy modules loaded by a text search: {', '.join(cold.modules) or 'none'}.")
    print("\n### Import costs (s, wall time of a fresh `python -c`, start and exit included)\n")
    print("| code | median | min | median minus `python -c pass` |")
    print("|---|---:|---:|---:|")
    baseline = median(cold.probes[IMPORT_PROBES[0][0]])
    for label, values in cold.probes.items():
        print(f"| `{label}` | {seconds_cell(values)} | {median(values) - baseline:.3f} |")
    if cold.importtime:
        print("\n`python -X importtime` of the cold search, cumulative seconds of key modules (one run):\n")
        print(", ".join(f"{name} {seconds:.3f}" for name, seconds in cold.importtime.items()))


# ---------------------------------------------------------------------- main


@dataclass
class RunResult:
    load_before: float
    text_encoding: list[float] = field(default_factory=list)
    text_encoders: list[TextEncoderTiming] = field(default_factory=list)
    results: dict[str, list[CandidateResult]] = field(default_factory=dict)
    cold: ColdResult | None = None


def library_params(args: argparse.Namespace, kind: Kind) -> DataParams:
    clustered = kind == "clustered"
    return DataParams(
        kind=kind,
        videos=args.videos,
        dim=args.dim,
        frames=args.frames,
        clusters=args.clusters if clustered else 0,
        video_spread=args.video_spread if clustered else 0.0,
        frame_noise=args.frame_noise if clustered else 0.0,
        seed=args.seed,
    )


def measure_library(args: argparse.Namespace, params: DataParams, directory: Path) -> list[CandidateResult]:
    with Library.open(directory) as library:
        eps = library_eps(library)
        queries = query_vectors(params, args.queries, args.query_noise)
        cache = args.workdir / f"{params.name}.truth-q{args.queries}-n{args.query_noise:g}.npz"
        truth = ground_truth(library, queries, eps, cache)
        library.knn(queries[0], 1)  # load the ANN index before timing
        results = []
        for k in args.candidates:
            results.append(measure_candidates(library, truth, queries, k, eps))
            log(f"{params.kind}: {k} candidates measured")
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512, help="feature size; the cold test needs the model's (512)")
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--clusters", type=int, default=300)
    parser.add_argument("--video-spread", type=float, default=0.8)
    parser.add_argument("--frame-noise", type=float, default=0.5)
    parser.add_argument("--query-noise", type=float, default=1.0)
    parser.add_argument("--queries", type=int, default=200, help="query vectors per library")
    parser.add_argument("--text-queries", type=int, default=50, help="sentences encoded for the text timing")
    parser.add_argument("--candidates", type=lambda s: [int(x) for x in s.split(",")], default=[100, 300, 1000])
    parser.add_argument("--cold-runs", type=int, default=5, help="0 skips the cold start test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "ts2cli-search-bench")
    parser.add_argument("--json", type=Path, help="also write every measurement to this file")
    args = parser.parse_args()
    if args.videos < max(args.candidates):
        parser.error("--videos must be at least the largest --candidates")
    args.workdir.mkdir(parents=True, exist_ok=True)
    run = RunResult(load_before=os.getloadavg()[0])

    weights = ensure_weights(args.workdir)
    model = load_model(model_options(weights), text_only=True)
    use_model = model.embed_dim == args.dim
    identity = model.identity if use_model else synthetic_identity(args.dim)
    libraries = {
        kind: ensure_library(args.workdir, library_params(args, kind), identity) for kind in ("clustered", "uniform")
    }
    if use_model:
        # As `ts2 search` does: the first search loads the text tower with torch (bf16 on a CPU with native bf16)
        # and exports it for the ONNX Runtime encoder that later searches use.
        with Library.open(libraries["clustered"]) as library:
            torch_model = load_library_model(library, None, device="cpu", text_only=True)
            onnx_model = load_text_encoder(library)
            assert onnx_model is not None, "the library did not get a text encoder export"
            threads = onnx_model.threads
            name = f"ONNX Runtime, float16 weights, {threads} thread{'s' * (threads > 1)} (ts2 search)"
            encoders: dict[str, TextModel] = {name: onnx_model}
            if threads > 1 and (alone := load_text_encoder(library, threads=1)) is not None:
                encoders["ONNX Runtime, float16 weights, 1 thread"] = alone
        torch_name = f"torch, {str(torch_model.dtype or torch.float32).removeprefix('torch.')}, 1 thread"
        encoders |= {torch_name: torch_model, "torch, float32 (reference)": model}
        run.text_encoders = compare_text_encoders(encoders, args.text_queries)
        run.text_encoding = run.text_encoders[0].seconds
    for kind, directory in libraries.items():
        run.results[kind] = measure_library(args, library_params(args, kind), directory)
    if args.cold_runs > 0 and use_model:
        query = sentences(1)[0]
        run.cold = measure_cold(libraries["clustered"], query, args.cold_runs, args.workdir, weights)
    print_report(args, run)
    if args.json:
        data = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, **asdict(run)}
        args.json.write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
