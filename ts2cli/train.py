"""``ts2 train``: fine-tune TS2-Net from CLIP on captioned videos with the reference recipe (spec §7–§8).

* Loss: symmetric InfoNCE over the whole global batch (texts × videos), logits = exp(logit_scale) · scores.
* Optimiser: BertAdam (β 0.9/0.98, eps 1e-6, no bias correction, decoupled weight decay 0.2 on every parameter
  whose name lacks "bias"); lr 1e-4 for the new parts (selector, temporal transformer) and 1e-7 for every name
  containing "clip."; warm-up cosine schedule on the step count, the first update at lr 0; global gradient
  clipping at 1.0; ``logit_scale`` clamped to ≤ ln 100 after each step; the embeddings of spec §8.3 frozen.
* Global batch on one device: the batch is encoded in micro-batches without a graph, the loss and its gradients
  with respect to the features are computed on the full matrix, then each micro-batch is encoded again with a
  graph and back-propagated from those gradients (gradient caching). The gradients equal those of one big batch,
  which plain gradient accumulation (a loss per micro-batch, fewer negatives) would not give.
* Precision: fp32 master weights with fp16/bf16 autocast on CUDA (fp32 on the CPU), or ``clip_fp16``: the
  reference's CLIP with its matrices stored, trained and updated in fp16, no loss scaling (spec §10.2).
* Determinism: the new parts' initial weights, the data order of an epoch and the top-k noise of a step are
  derived from the seed, so two runs with the same options give the same weights, and a run resumed from its
  epoch checkpoint continues exactly as if it had not stopped.

Each epoch writes ``epoch-N.safetensors``, then ``last.state.pt`` (optimiser, schedule, scaler, history) for
``--resume``, then ``last.safetensors`` (the newest epoch's file, hard-linked or copied, for ``--checkpoint``).
The state file is the commit point: ``--resume`` takes the weights of the epoch it records, so an interruption
anywhere in between leaves a consistent pair behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from .datasets import CaptionSet
from .decode import decode_ahead
from .errors import CheckpointError, Ts2Error, VideoDecodeError, one_line
from .evaluate import (
    EvalOptions,
    EvalProgress,
    EvalResult,
    FrameSampler,
    Head,
    default_workers,
    evaluate,
    frame_sampler,
    head_scores,
)
from .metrics import TieMode
from .model import LoadedModel, ModelOptions, load_model, out_of_memory_says, save_checkpoint, symmetric_infonce
from .model.preprocess import tokenize
from .model_record import MODEL_SOURCE_KEY

Precision = Literal["auto", "fp32", "fp16", "bf16"]
PRECISIONS: tuple[Precision, ...] = ("auto", "fp32", "fp16", "bf16")

# Spec §8.3: frozen even with freeze_layer_num = 0.
FROZEN = (
    "clip.visual.conv1.weight",
    "clip.visual.class_embedding",
    "clip.visual.positional_embedding",
    "clip.visual.ln_pre.weight",
    "clip.visual.ln_pre.bias",
    "clip.token_embedding.weight",
    "clip.positional_embedding",
)
LOGIT_SCALE = "clip.logit_scale"
LAST_CHECKPOINT = "last.safetensors"
STATE_FILE = "last.state.pt"
STATE_KEYS = ("epoch", "step", "optimizer", "scheduler", "scaler", "recipe", "items", "history", "failed")
# Options that change only memory use: a resumed run may change them. (A different --micro-batch regroups the
# top-k noise draws and float sums, so the continuation is equivalent but not bit-identical.)
MEMORY_ONLY = ("micro_batch",)


@dataclass(frozen=True)
class TrainOptions:
    out_dir: Path
    epochs: int = 5
    batch_size: int = 128
    """Global batch: the size of the similarity matrix of one step."""
    micro_batch: int = 16
    """Videos encoded at once; smaller than ``batch_size`` trades a second forward pass for memory."""
    lr: float = 1e-4
    clip_lr: float = 1e-7
    """lr · coef_lr of the reference: every parameter whose name contains "clip."."""
    weight_decay: float = 0.2
    warmup: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 42
    precision: Precision = "auto"
    clip_fp16: bool = False
    simulate_ranks: int = 1
    """Divide all gradients but logit_scale's by this, as the reference's 8-GPU all-gather did (spec §8.4)."""
    head: Head = "ts2"
    """"meanpool": the baseline of the shapes benchmark, CLIP frames mean-pooled, no token shift or selection."""
    resume: bool = False
    workers: int | None = None
    frame_memory_mb: int = 4096
    """Decoded frames kept in memory between epochs (the frames of a video never change: no augmentation)."""
    ties: TieMode = "strict"

    def recipe(self) -> dict[str, Any]:
        """The options that decide the result: a resumed run must use the same ones."""
        skip = {"out_dir", "resume", "workers", "frame_memory_mb"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


@dataclass
class EpochRecord:
    epoch: int
    loss: float
    lr: float
    steps: int
    seconds: float
    checkpoint: str
    metrics: dict[str, dict[str, float]] | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainSummary:
    out_dir: Path
    checkpoint: Path
    epochs: list[EpochRecord]
    failed: dict[str, str]
    steps: int
    seconds: float
    missing: list[str] = dataclasses.field(default_factory=list)
    """Training videos left out because their files were absent (``--allow-missing``)."""
    eval_missing: list[str] = dataclasses.field(default_factory=list)
    """The same for the evaluation list: its metrics are then not comparable with full-set numbers."""
    eval_failed: dict[str, str] = dataclasses.field(default_factory=dict)
    """Evaluation videos that could not be decoded (scored as ``ts2 eval`` scores them), with the reason."""
    resumed_from: int | None = None
    """The saved epoch a ``--resume`` went on from (the run's last one if it was complete); None for a new run."""

    @property
    def best_epoch(self) -> EpochRecord | None:
        """The epoch the reference would keep (best plain t2v R@1 on the eval list, spec §8.5)."""
        scored = [e for e in self.epochs if e.metrics]
        return max(scored, key=lambda e: e.metrics["t2v"]["R@1"]) if scored else None  # type: ignore[index]

    def to_json(self) -> dict[str, Any]:
        best = self.best_epoch
        return {
            "out_dir": str(self.out_dir),
            "checkpoint": str(self.checkpoint),
            "steps": self.steps,
            "epochs": [e.to_json() for e in self.epochs],
            "best_epoch": best.epoch if best else None,
            "last_epoch": self.epochs[-1].epoch if self.epochs else None,
            "failed": [{"video": v, "reason": r} for v, r in self.failed.items()],
            "missing": self.missing,
            "eval_missing": self.eval_missing,
            "eval_failed": [{"video": v, "reason": r} for v, r in self.eval_failed.items()],
            "resumed_from": self.resumed_from,
            "seconds": round(self.seconds, 3),
        }


class TrainProgress(EvalProgress):
    """What training reports while it runs (evaluation after an epoch reports through ``EvalProgress``)."""

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None: ...

    def step_done(self, loss: float, lr: float) -> None: ...

    def epoch_done(self, record: EpochRecord) -> None: ...


class _FailuresOnce(TrainProgress):
    """``progress``, but each failed video is reported once, though every epoch's evaluation decodes its list
    again."""

    def __init__(self, progress: TrainProgress) -> None:
        self._progress, self._told = progress, set[str]()

    def failed(self, name: str, reason: str) -> None:
        if name not in self._told:
            self._told.add(name)
            self._progress.failed(name, reason)

    def start(self, description: str, total: int) -> None:
        self._progress.start(description, total)

    def advance(self, count: int = 1) -> None:
        self._progress.advance(count)

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        self._progress.epoch_start(epoch, epochs, steps)

    def step_done(self, loss: float, lr: float) -> None:
        self._progress.step_done(loss, lr)

    def epoch_done(self, record: EpochRecord) -> None:
        self._progress.epoch_done(record)


# --- optimiser and schedule -----------------------------------------------------------------------------------


class BertAdam(torch.optim.Optimizer):
    """The reference's optimiser (spec §8.2): Adam without bias correction, weight decay added to the update.

    m ← β1·m + (1-β1)·g;  v ← β2·v + (1-β2)·g²;  u = m / (√v + eps) + wd·p;  p ← p − lr·u.
    States have the parameter's dtype, so fp16 parameters are updated in fp16 as in the reference (spec §10.2).
    Its per-tensor gradient clipping is left out: after the global clip at the same norm it never acts.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                state = self.state[param]
                if not state:
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                update = exp_avg / (exp_avg_sq.sqrt() + group["eps"])
                if group["weight_decay"] > 0:
                    update.add_(param, alpha=group["weight_decay"])
                # lr·u is rounded before it is subtracted, as in the reference (it matters for fp16 weights).
                param.sub_(update.mul_(group["lr"]))
        return loss


@dataclass(frozen=True)
class WarmupCosine:
    """The reference's ``warmup_cosine`` factor of step s: x/w while x = s/total < w, then ½(1 + cos πx).

    The cosine is not renormalised after the warm-up, so the factor drops from 1.0 to cos-value 0.976 at x = w.
    """

    total_steps: int
    warmup: float = 0.1

    def __call__(self, step: int) -> float:
        x = step / self.total_steps
        if x < self.warmup:
            return x / self.warmup
        return 0.5 * (1.0 + math.cos(math.pi * x))


def param_groups(net: nn.Module, lr: float, clip_lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """Four groups: CLIP or new parts × decayed or not, named as the reference decides them (spec §8.2)."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in net.named_parameters():
        if not param.requires_grad:
            continue
        # The reference tests the substring "clip." (its temporal module "transformerClip." does not match).
        key = ("clip." in name, "bias" not in name)
        groups.setdefault(key, []).append(param)
    return [
        {"params": params, "lr": clip_lr if is_clip else lr, "weight_decay": weight_decay if decay else 0.0}
        for (is_clip, decay), params in sorted(groups.items())
    ]


def freeze_embeddings(net: nn.Module) -> None:
    """Everything trains except the parameters listed in ``FROZEN`` (spec §8.3)."""
    for name, param in net.named_parameters():
        param.requires_grad_(name not in FROZEN)


def clip_to_fp16(clip: nn.Module) -> None:
    """The reference's ``convert_weights``: Conv/Linear weights and biases, attention projections, ``proj`` and
    ``text_projection`` stored in fp16; LayerNorms, embeddings and logit_scale stay fp32 (spec §10.2)."""
    for module in clip.modules():
        tensors: list[str] = []
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Linear):
            tensors = ["weight", "bias"]
        elif isinstance(module, nn.MultiheadAttention):
            tensors = ["in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias"]
            tensors += ["bias_k", "bias_v"]
        tensors += ["text_projection", "proj"]
        for name in tensors:
            tensor = getattr(module, name, None)
            if isinstance(tensor, nn.Parameter):
                tensor.data = tensor.data.half()


def autocast_dtype(device: torch.device, precision: Precision, clip_fp16: bool) -> torch.dtype | None:
    """The autocast dtype of training, None for plain fp32."""
    if clip_fp16:
        # fp16 weights need fp16 activations; autocast gives them without a second copy of the weights.
        return torch.float16
    if precision == "auto":
        if device.type != "cuda":
            return None
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


# --- data -----------------------------------------------------------------------------------------------------


def epoch_items(data: CaptionSet, seed: int, epoch: int) -> list[tuple[int, int]]:
    """(video, caption) pairs of one epoch in training order, a function of the seed and the epoch only.

    Expanded data has one item per caption (spec §8.1); otherwise one per video with a caption drawn at random.
    """
    rng = np.random.default_rng([seed, epoch])
    if data.expanded:
        return [(int(data.caption_video[c]), int(c)) for c in rng.permutation(len(data.captions))]
    # Captions grouped by video: video v owns by_video[first[v] : first[v] + counts[v]].
    counts = np.bincount(data.caption_video, minlength=len(data.videos))
    first = np.cumsum(counts) - counts
    by_video = np.argsort(data.caption_video, kind="stable")
    chosen = by_video[first + rng.integers(0, counts)]
    return [(int(v), int(chosen[v])) for v in rng.permutation(len(data.videos))]


class FrameMemory:
    """A frame sampler that remembers what it decoded, up to a byte budget, and which files failed.

    Training reads every video once per epoch and the frames never change (no augmentation, spec §1.2).
    Thread-safe: the decode threads call it concurrently.
    """

    def __init__(self, sampler: FrameSampler, budget_bytes: int) -> None:
        self.sampler = sampler
        self.budget = budget_bytes
        self.used = 0
        self._frames: dict[Path, np.ndarray] = {}
        self._failures: dict[Path, str] = {}
        self._lock = threading.Lock()

    def __call__(self, path: Path) -> np.ndarray:
        with self._lock:
            if path in self._failures:
                raise VideoDecodeError(self._failures[path])
            if path in self._frames:
                return self._frames[path]
        try:
            frames = self.sampler(path)
        except Ts2Error as error:
            with self._lock:
                self._failures[path] = str(error)
            raise
        with self._lock:
            if self.used + frames.nbytes <= self.budget and path not in self._frames:
                self._frames[path] = frames
                self.used += frames.nbytes
        return frames


# --- the trainer ----------------------------------------------------------------------------------------------


class Trainer:
    """One training run: model, optimiser, schedule and the step loop; ``train`` drives it over the epochs."""

    def __init__(self, loaded: LoadedModel, data: CaptionSet, options: TrainOptions) -> None:
        self.loaded, self.net, self.data, self.options = loaded, loaded.net, data, options
        self.device = loaded.device
        self.steps_per_epoch = len(data) // options.batch_size
        self.total_steps = self.steps_per_epoch * options.epochs
        net = self.net.train()
        if options.clip_fp16:
            clip_to_fp16(net.clip)
        freeze_embeddings(net)
        self.parameters = [p for p in net.parameters() if p.requires_grad]
        self.dtype = autocast_dtype(self.device, options.precision, options.clip_fp16)
        if options.clip_fp16 and self.device.type == "cuda":
            # Evaluation after an epoch must feed the fp16 weights fp16 activations too. LoadedModel autocasts only
            # on CUDA; on other devices ``_evaluate`` runs the weights in fp32 instead.
            loaded.dtype = torch.float16
        # Evaluation runs the weights being trained, in their own precision: never a bf16 copy taken at the
        # first evaluation (``LoadedModel.choose_precision``), which later epochs would not update.
        loaded.precision_known = True
        self.optimizer = BertAdam(param_groups(net, options.lr, options.clip_lr, options.weight_decay))
        self.schedule = WarmupCosine(self.total_steps, options.warmup)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        # Loss scaling only for fp16 autocast over fp32 weights; the reference's pure fp16 had none.
        use_scaler = self.dtype == torch.float16 and not options.clip_fp16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self.step = 0
        self.epoch = 0
        self.history: list[EpochRecord] = []
        self.failed: dict[str, str] = {}

    # state for --resume ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # No RNG state is needed: data order and top-k noise are derived from (seed, epoch, step).
        return {
            "epoch": self.epoch,
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "recipe": self._recipe(),
            "items": len(self.data),
            "data": self.data.digest(),
            "history": [r.to_json() for r in self.history],
            "failed": self.failed,
        }

    def _recipe(self) -> dict[str, Any]:
        config = self.loaded.config
        return _jsonable({**self.options.recipe(), "compat": config.compat, "frames": config.frames})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        recipe = self._recipe()
        # Named as the command-line options (fields without an option, such as max_grad_norm, read alike).
        changed = sorted(
            f"--{k.replace('_', '-')}" for k in recipe if k not in MEMORY_ONLY and state["recipe"].get(k) != recipe[k]
        )
        if state["items"] != len(self.data):
            changed.append(f"data ({state['items']} items before, {len(self.data)} now)")
        elif state.get("data") not in (None, self.data.digest()):  # None: a state written before the digest was
            changed.append("data (other videos or captions, as many as before)")
        if changed:
            raise Ts2Error(f"Cannot resume: the run was started with other settings ({', '.join(changed)}).")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.history = [EpochRecord(**record) for record in state["history"]]
        self.failed = dict(state["failed"])

    # one step ---------------------------------------------------------------------------------------------
    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def encode_chunk(self, pixels: torch.Tensor, mask: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame features of micro-batch ``chunk`` of the current step (same top-k noise on every call)."""
        if self.net.selector is not None:
            # Noise per (seed, step, micro-batch): the two passes of gradient caching see the same top-k draws,
            # and a resumed run the same draws as an uninterrupted one.
            seed = np.random.SeedSequence([self.options.seed, self.step, chunk]).generate_state(1)[0]
            self.net.selector.reseed(int(seed))
        return self.net.encode_video(pixels, mask)

    def logits(self, text: torch.Tensor, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """exp(logit_scale) · scores, texts × videos."""
        # In fp32, outside autocast, as the reference computes its similarity and loss.
        scores = head_scores(self.net, self.options.head, text.float(), frames.float(), mask)
        return self.net.clip.logit_scale.float().exp() * scores

    def backward(self, ids: torch.Tensor, pixels: torch.Tensor, mask: torch.Tensor) -> float:
        """Accumulate the gradients of one global batch; returns its loss."""
        micro = self.options.micro_batch
        chunks = [slice(start, start + micro) for start in range(0, len(ids), micro)]
        if len(chunks) == 1:
            with self._autocast():
                text = self.net.encode_text(ids)
                frames, frame_mask = self.encode_chunk(pixels, mask, 0)
            loss = symmetric_infonce(self.logits(text, frames, frame_mask))
            self.scaler.scale(loss).backward()
            return loss.item()

        # Gradient caching: features of the whole batch without a graph, loss gradients w.r.t. the features...
        with torch.no_grad(), self._autocast():
            encoded = [
                (self.net.encode_text(ids[c]), *self.encode_chunk(pixels[c], mask[c], i)) for i, c in enumerate(chunks)
            ]
        text = torch.cat([t for t, _, _ in encoded]).float().requires_grad_()
        frames = torch.cat([f for _, f, _ in encoded]).float().requires_grad_()
        frame_mask = torch.cat([m for _, _, m in encoded])
        loss = symmetric_infonce(self.logits(text, frames, frame_mask))
        self.scaler.scale(loss).backward()  # also the full gradient of logit_scale
        # ...then each micro-batch again, with a graph, back-propagated from its slice of those gradients.
        for i, c in enumerate(chunks):
            with self._autocast():
                chunk_text = self.net.encode_text(ids[c])
                chunk_frames, _ = self.encode_chunk(pixels[c], mask[c], i)
            torch.autograd.backward([chunk_text.float(), chunk_frames.float()], [text.grad[c], frames.grad[c]])
        return loss.item()

    def update(self) -> float:
        """Apply the accumulated gradients; returns the lr factor this update used."""
        if self.options.simulate_ranks > 1:
            for name, param in self.net.named_parameters():
                if param.grad is not None and name != LOGIT_SCALE:
                    param.grad.div_(self.options.simulate_ranks)
        factor = self.schedule(self.step)
        self.scaler.unscale_(self.optimizer)
        nn.utils.clip_grad_norm_(self.parameters, self.options.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.net.clamp_logit_scale()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return factor

    def train_step(self, captions: list[str], videos: list[np.ndarray]) -> tuple[float, float]:
        """One optimiser step on a batch of captions and their videos' frames; returns (loss, lr)."""
        ids = tokenize(captions, self.loaded.config.words).ids.to(self.device)
        pixels, mask = self.loaded.video_batch(videos)
        pixels, mask = pixels.to(self.device), mask.to(self.device)
        loss = self.backward(ids, pixels, mask)
        return loss, self.options.lr * self.update()

    # one epoch --------------------------------------------------------------------------------------------
    def run_epoch(self, frames: FrameSampler, progress: TrainProgress) -> tuple[float, float]:
        """Train on one epoch's batches (the last partial batch dropped, as the reference does); returns the mean
        loss and the last lr. A video that fails to decode is reported once and its items are left out."""
        options = self.options
        items = epoch_items(self.data, options.seed, self.epoch)[: self.steps_per_epoch * options.batch_size]
        workers = options.workers or default_workers()

        def decode(item: tuple[int, int]) -> np.ndarray:
            return frames(self.data.videos[item[0]])

        losses, lr = [], 0.0
        batch: list[tuple[str, np.ndarray]] = []
        for position, ((video, caption), outcome) in enumerate(
            decode_ahead(items, decode, workers, 2 * options.batch_size), 1
        ):
            if isinstance(outcome, str):
                name = self.data.video_ids[video]
                if name not in self.failed:
                    self.failed[name] = outcome
                    progress.failed(str(self.data.videos[video]), outcome)
            else:
                batch.append((self.data.captions[caption], outcome))
            if position % options.batch_size == 0:
                # One video left of a batch has nothing to be told apart from: its loss is 0 and it teaches nothing.
                if len(batch) >= 2:
                    with out_of_memory_says(
                        f"training on {len(batch)} videos, {options.micro_batch} at a time, on {self.device.type}",
                        "run again with a smaller --micro-batch (with --resume after a saved epoch)",
                    ):
                        loss, lr = self.train_step([c for c, _ in batch], [f for _, f in batch])
                    if not math.isfinite(loss):
                        raise Ts2Error(
                            f"Training diverged: the loss is {loss} at step {self.step} (epoch {self.epoch + 1}); "
                            "lower --lr or --clip-lr. The epochs saved before are kept."
                        )
                    losses.append(loss)
                    progress.step_done(loss, lr)
                batch = []
        if not losses:
            # Otherwise untrained weights would be saved and labelled as a trained epoch.
            raise VideoDecodeError(
                f"Epoch {self.epoch + 1} could not run a single step: every batch lost all its videos but one at most "
                f"to decoding failures ({len(self.failed)} of {len(self.data.videos)} videos failed)."
            )
        return float(np.mean(losses)), lr

    def save(self, record: EpochRecord, provenance: dict[str, Any]) -> None:
        """Commit the epoch. Each file is replaced atomically, and the state file, which ``--resume`` pairs with
        the epoch checkpoint it records, is written only once that checkpoint is complete."""
        out = Path(self.options.out_dir)
        config = dataclasses.replace(self.loaded.config, provenance=_jsonable(provenance))
        save_checkpoint(self.net, epoch_checkpoint(out, record.epoch), config)
        partial = out / f".{STATE_FILE}.partial"
        torch.save(self.state_dict(), partial)
        os.replace(partial, out / STATE_FILE)
        _replace_with_copy(epoch_checkpoint(out, record.epoch), out / LAST_CHECKPOINT)


def epoch_checkpoint(out: Path, epoch: int) -> Path:
    return out / f"epoch-{epoch}.safetensors"


def interrupted_note(out_dir: Path) -> str:
    """What an interrupted ``ts2 train`` leaves in ``out_dir``, and how to go on."""
    if (Path(out_dir) / STATE_FILE).is_file():
        return f"Interrupted; saved epochs are kept in {out_dir}: continue with --resume."
    return "Interrupted before the first epoch was saved: run the command again, without --resume, to start over."


def train(
    model: ModelOptions,
    data: CaptionSet,
    options: TrainOptions,
    *,
    eval_data: CaptionSet | None = None,
    data_name: str = "",
    progress: TrainProgress | None = None,
    frames: FrameMemory | None = None,
) -> TrainSummary:
    """Train for ``options.epochs`` epochs (or what is left of them with ``resume``), checkpointing each one and
    evaluating on ``eval_data`` after each when given. ``frames`` lets several runs over the same videos share
    their decoded frames (it must sample as the model's compat mode, frame count and image size say)."""
    started = time.perf_counter()
    progress = _FailuresOnce(progress or TrainProgress())
    _check(options, data)
    out = Path(options.out_dir)
    state = _resume_state(out) if options.resume else None
    if state is None and (out / STATE_FILE).exists():
        raise Ts2Error(f"{out} already holds a training run; continue it with --resume or choose another --out.")
    if state is None and (out / LAST_CHECKPOINT).exists():
        raise Ts2Error(
            f"{out} holds {LAST_CHECKPOINT} but no {STATE_FILE} to resume it from; choose another --out, "
            f"or delete {LAST_CHECKPOINT} there to start over."
        )
    created = not out.exists()
    _check_out(out)
    with _removed_if_left_empty(out, created):
        # Building a model from CLIP weights initialises the new parts from torch's global RNG: seed it (without
        # disturbing the caller's RNG) so that the same options give the same run.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(options.seed)
            loaded = _load(model, options, resume_from=epoch_checkpoint(out, state["epoch"]) if state else None)
        trainer = Trainer(loaded, data, options)
        if state is not None:
            committed = epoch_checkpoint(out, state["epoch"])
            if loaded.config.provenance.get("epoch") != state["epoch"]:
                raise CheckpointError(f"Cannot resume: {committed} is not the epoch {out / STATE_FILE} records.")
            trainer.load_state_dict(state)
            # An interruption between the state file and last.safetensors leaves the latter an epoch behind.
            _replace_with_copy(committed, out / LAST_CHECKPOINT)
        config = loaded.config
        sampling, sampler = frame_sampler(config.compat, config.frames, loaded.image_size)
        frames = frames or FrameMemory(sampler, options.frame_memory_mb * 1024 * 1024)
        started_from = config.provenance.get("started_from") if state else None
        started_from = started_from or {k: v for k, v in loaded.identity.items() if k != MODEL_SOURCE_KEY}
        eval_failed: dict[str, str] = {}
        if state is not None and eval_data is not None and trainer.history and trainer.history[-1].metrics is None:
            # The evaluation after the last saved epoch was interrupted (or not asked for then): do it now, as an
            # uninterrupted run would have, before training on.
            record = trainer.history[-1]
            evaluated = _evaluate(trainer, eval_data, frames, progress)
            record.metrics = evaluated.metrics
            eval_failed.update(evaluated.failed)
            trainer.save(record, {**config.provenance, "eval": record.metrics})

        while trainer.epoch < options.epochs:
            epoch_started = time.perf_counter()
            progress.epoch_start(trainer.epoch + 1, options.epochs, trainer.steps_per_epoch)
            loss, lr = trainer.run_epoch(frames, progress)
            trainer.epoch += 1
            record = EpochRecord(
                epoch=trainer.epoch,
                loss=loss,
                lr=lr,
                steps=trainer.step,
                seconds=round(time.perf_counter() - epoch_started, 3),
                checkpoint=str(epoch_checkpoint(out, trainer.epoch)),
            )
            trainer.history.append(record)
            provenance = {
                "trained_by": "ts2 train",
                "head": options.head,
                "data": data_name,
                "items_per_epoch": len(data),
                "missing_videos": len(data.missing),
                "sampling": sampling,
                "epoch": trainer.epoch,
                "step": trainer.step,
                "recipe": options.recipe(),
                "started_from": started_from,
                "eval": None,
            }
            # Committed before the evaluation, so that a failed or interrupted evaluation loses no training.
            trainer.save(record, provenance)
            if eval_data is not None:
                evaluated = _evaluate(trainer, eval_data, frames, progress)
                record.metrics = evaluated.metrics
                eval_failed.update(evaluated.failed)
                record.seconds = round(time.perf_counter() - epoch_started, 3)
                trainer.save(record, {**provenance, "eval": record.metrics})
            progress.epoch_done(record)

        return TrainSummary(
            out_dir=out,
            checkpoint=out / LAST_CHECKPOINT,
            epochs=trainer.history,
            failed=trainer.failed,
            steps=trainer.step,
            seconds=time.perf_counter() - started,
            missing=list(data.missing),
            eval_missing=list(eval_data.missing) if eval_data is not None else [],
            eval_failed=eval_failed,
            resumed_from=state["epoch"] if state else None,
        )


def _evaluate(trainer: Trainer, data: CaptionSet, frames: FrameMemory, progress: TrainProgress) -> EvalResult:
    net = trainer.net.eval()
    # Without CUDA's autocast the fp16 CLIP weights would meet fp32 activations: evaluate them in fp32 (the same
    # values, exactly), then store them back in fp16 for the next epoch.
    upcast = trainer.options.clip_fp16 and trainer.device.type != "cuda"
    if upcast:
        net.float()
    try:
        options = EvalOptions(
            batch_size=trainer.options.micro_batch, workers=trainer.options.workers, ties=trainer.options.ties
        )
        result = evaluate(trainer.loaded, data, options, progress=progress, sampler=frames, head=trainer.options.head)
    finally:
        if upcast:
            clip_to_fp16(net.clip)
        net.train()
    return result


def _check(options: TrainOptions, data: CaptionSet) -> None:
    if options.epochs < 1 or options.micro_batch < 1 or options.simulate_ranks < 1:
        raise Ts2Error("--epochs, --micro-batch and --simulate-ranks must be at least 1.")
    if options.batch_size < 2:
        raise Ts2Error("--batch-size must be at least 2: the loss contrasts the items of a batch.")
    if len(data) < options.batch_size:
        raise Ts2Error(
            f"The training data has {len(data)} items, fewer than one batch (--batch-size {options.batch_size})."
        )
    if options.precision not in PRECISIONS:
        raise Ts2Error(f"Unknown --precision '{options.precision}'; use {', '.join(PRECISIONS)}.")


@contextlib.contextmanager
def _removed_if_left_empty(folder: Path, created: bool) -> Iterator[None]:
    """A run that stops before it saves anything (no GPU, every video broken, Ctrl-C) leaves no empty --out folder
    behind; one that saved an epoch keeps it (rmdir refuses a folder that is not empty)."""
    try:
        yield
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _check_out(out: Path) -> None:
    """Checked before any work: the first checkpoint is written only after a whole epoch."""
    if out.exists() and not out.is_dir():
        raise Ts2Error(f"--out {out} is a file; give a folder for the checkpoints.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise Ts2Error(f"Cannot create the --out folder {out}: {one_line(error)}") from None


def _resume_state(out: Path) -> dict[str, Any]:
    """The committed training state in ``out``, checked for the keys ``Trainer.load_state_dict`` reads and for
    the epoch checkpoint it belongs to."""
    state_file = out / STATE_FILE
    if not state_file.is_file():
        raise Ts2Error(
            f"Nothing to resume in {out}: it has no {STATE_FILE}, which a run writes when an epoch is complete; "
            "start without --resume."
        )
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated or foreign files fail in many ways inside torch and zipfile
        raise CheckpointError(f"Cannot resume: {state_file} is unreadable ({one_line(error)}).") from None
    missing = [key for key in STATE_KEYS if key not in state] if isinstance(state, dict) else list(STATE_KEYS)
    if missing:
        raise CheckpointError(f"Cannot resume: {state_file} is not a ts2 training state (no {', '.join(missing)}).")
    checkpoint = epoch_checkpoint(out, state["epoch"])
    if not checkpoint.is_file():
        raise CheckpointError(f"Cannot resume: {checkpoint}, the weights {state_file} belongs to, is missing.")
    return state


def _replace_with_copy(source: Path, target: Path) -> None:
    """Atomically make ``target`` hold what ``source`` holds: a hard link where the file system has them (no second
    copy of the weights on disk; checkpoints are only ever replaced, never written in place), else a copy."""
    partial = target.with_name(f".{target.name}.partial")
    partial.unlink(missing_ok=True)
    try:
        os.link(source, partial)
    except OSError:
        shutil.copyfile(source, partial)
    os.replace(partial, target)


def _load(model: ModelOptions, options: TrainOptions, *, resume_from: Path | None) -> LoadedModel:
    if resume_from is not None:
        loaded = load_model(dataclasses.replace(model, checkpoint=resume_from))
    elif model.checkpoint is not None:
        loaded = load_model(model)  # fine-tune an existing TS2-Net checkpoint further
    else:
        loaded = load_model(model, trainable=options.head == "ts2")
    zero_shot = loaded.config.zero_shot
    if options.head == "ts2" and zero_shot:
        raise Ts2Error(
            "This checkpoint has no TS2-Net parts (selector, temporal transformer) to train with --head ts2."
        )
    if options.head == "meanpool" and not zero_shot:
        raise Ts2Error(
            "--head meanpool trains CLIP alone; start it from CLIP weights (--pretrained), not a checkpoint."
        )
    return loaded


def _jsonable(data: Any) -> Any:
    """Paths as strings, so options can go into checkpoint metadata and be compared after a reload."""
    if isinstance(data, dict):
        return {k: _jsonable(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_jsonable(v) for v in data]
    return str(data) if isinstance(data, Path) else data
