"""Does ts2's TS2-Net learn motion? Train a tiny one on the moving-shapes data set and compare with a baseline.

Writes the synthetic data set of ``ts2cli.synthetic`` (captions like "a red square moving left"; clips come in
mirrored pairs with the same frames in opposite orders), then trains, with the same recipe and step budget, on the
CPU and from random weights (nothing is downloaded):

* ``ts2``: TS2-Net (token shift, token selection, temporal transformer, frame-weighted similarity);
* ``meanpool``: the same tiny CLIP with its frame features mean-pooled, no token shift: it sees a clip as a bag
  of frames, so it cannot tell a clip from its mirror image.

Both are scored on held-out clips: text→video R@1 and R@5 (72 test captions, one right clip each), and the
direction accuracy: how often a caption scores its own clip above the mirrored twin (chance 50%).

    python benchmarks/train_shapes.py                  # about 5 minutes on 2 CPU cores
    python benchmarks/train_shapes.py --epochs 2       # a quick look
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ts2cli.datasets import CaptionSet, load_caption_csv
from ts2cli.evaluate import encode_captions, encode_videos, frame_sampler, retrieval_report, similarity_matrix
from ts2cli.model import ModelOptions, load_model
from ts2cli.synthetic import MOTION_PAIRS, write_shapes_splits
from ts2cli.train import FrameMemory, TrainOptions, TrainProgress, train


def tiny_clip(size: int) -> dict[str, Any]:
    """A small ViT: frames of ``size`` pixels in a 4×4 grid of patches (16 + CLS tokens), width 64; a 2-layer text
    tower over CLIP's real BPE vocabulary. Random initialisation: the benchmark must run without downloads."""
    return {
        "embed_dim": 64,
        "quick_gelu": True,
        "vision_cfg": {"image_size": size, "layers": 3, "width": 64, "patch_size": size // 4},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2},
    }


OPPOSITE = {a: b for pair in MOTION_PAIRS for a, b in (pair, pair[::-1])}


class Printer(TrainProgress):
    def __init__(self, name: str) -> None:
        self.name = name
        self.losses: list[float] = []

    def step_done(self, loss: float, lr: float) -> None:
        self.losses.append(loss)

    def epoch_done(self, record: Any) -> None:
        print(f"  {self.name} epoch {record.epoch}: loss {record.loss:.3f} ({record.seconds:.0f} s)", flush=True)


def twin_index(data: CaptionSet) -> np.ndarray:
    """For each caption, the video whose caption names the opposite motion of the same coloured shape."""
    by_caption = {caption: int(video) for caption, video in zip(data.captions, data.caption_video, strict=True)}
    twins = []
    for caption in data.captions:
        motion = next(m for m in OPPOSITE if caption.endswith(" " + m))
        twins.append(by_caption[caption.removesuffix(motion) + OPPOSITE[motion]])
    return np.array(twins)


def score(checkpoint: Path, test: CaptionSet, frames: int, selection: str = "hard") -> dict[str, float]:
    """Held-out t2v R@1, R@5 and direction accuracy. ``selection="perturbed"`` scores TS2-Net with the perturbed
    top-k it was trained with (seeded), as the reference evaluates, instead of ts2's default hard top-k."""
    # compat "official" switches the top-k to perturbed; the frames still come from the uniform sampler the
    # model was trained on, and with every frame valid the official mask and padding rules change nothing.
    compat = "official" if selection == "perturbed" else "fixed"
    loaded = load_model(ModelOptions(checkpoint=checkpoint, device="cpu", frames=frames, compat=compat))
    _, sampler = frame_sampler("fixed", frames, loaded.image_size)
    videos = encode_videos(loaded, test.videos, sampler)
    text, _ = encode_captions(loaded, test.captions)
    sim = similarity_matrix(loaded, text, videos)
    t2v = retrieval_report(sim, test.caption_video)["t2v"]
    rows = np.arange(len(test.captions))
    direction = float(100 * np.mean(sim[rows, test.caption_video] > sim[rows, twin_index(test)]))
    return {"R@1": t2v["R@1"], "R@5": t2v["R@5"], "direction": direction}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--train", type=int, default=2304, help="training clips")
    parser.add_argument("--test", type=int, default=72, help="held-out clips (at most 72: unique captions)")
    parser.add_argument("--epochs", type=int, default=11)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--frames", type=int, default=2, help="frames per clip given to the model")
    parser.add_argument("--size", type=int, default=32, help="clip and model image size in pixels")
    parser.add_argument("--lr", type=float, default=3e-3, help="lr of the new parts (selector, temporal)")
    parser.add_argument("--clip-lr", type=float, default=3e-3, help="lr of the randomly initialised CLIP")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (one is fastest on shared cores)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)

    work = args.out or Path(tempfile.mkdtemp(prefix="ts2-shapes-"))
    started = time.perf_counter()
    train_csv, test_csv = write_shapes_splits(work / "data", args.train, args.test, seed=args.seed, size=args.size)
    train_set, test_set = load_caption_csv(train_csv), load_caption_csv(test_csv)
    print(f"data: {len(train_set)} training clips, {len(test_set)} test clips ({time.perf_counter() - started:.0f} s)")

    model = ModelOptions(
        model="tiny-shapes", pretrained=None, backbone_cfg=tiny_clip(args.size), device="cpu", frames=args.frames
    )
    # Both runs read the same frames: decode them once.
    frames = FrameMemory(frame_sampler("fixed", args.frames, args.size)[1], budget_bytes=2**31)
    results: dict[str, dict[str, float]] = {}
    for head in ("ts2", "meanpool"):
        options = TrainOptions(
            out_dir=work / head,
            epochs=args.epochs,
            batch_size=args.batch_size,
            micro_batch=args.batch_size,
            lr=args.lr,
            clip_lr=args.clip_lr,
            seed=args.seed,
            head=head,
        )
        began = time.perf_counter()
        summary = train(model, train_set, options, data_name="shapes", progress=Printer(head), frames=frames)
        seconds = time.perf_counter() - began
        results[head] = {**score(summary.checkpoint, test_set, args.frames), "train_s": seconds}
        if head == "ts2":
            perturbed = score(summary.checkpoint, test_set, args.frames, selection="perturbed")
            results["ts2_perturbed"] = {**perturbed, "train_s": seconds}

    chance = {"R@1": 100 / len(test_set), "R@5": 500 / len(test_set), "direction": 50.0}
    print(f"\nheld-out t2v over {len(test_set)} captions, {args.epochs} epochs of {len(train_set)} clips each:")
    print(f"{'model':<34}{'R@1':>7}{'R@5':>7}{'direction':>11}{'train s':>9}")
    names = {
        "ts2": "TS2-Net, hard top-k (ts2 default)",
        "ts2_perturbed": "TS2-Net, perturbed top-k (paper)",
        "meanpool": "mean-pooled frames, no shift",
    }
    for head, row in results.items():
        print(f"{names[head]:<34}{row['R@1']:7.1f}{row['R@5']:7.1f}{row['direction']:11.1f}{row['train_s']:9.0f}")
    print(f"{'chance':<34}{chance['R@1']:7.1f}{chance['R@5']:7.1f}{chance['direction']:11.1f}")
    print(f"total {time.perf_counter() - started:.0f} s; data and checkpoints in {work}")
    if args.json:
        print(json.dumps({"results": results, "chance": chance, "args": {k: str(v) for k, v in vars(args).items()}}))


if __name__ == "__main__":
    main()
