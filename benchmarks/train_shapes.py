"""Does ts2's TS2-Net learn motion? Train a tiny one on the moving-shapes data set and compare with a baseline.

Writes the synthetic data set of ``ts2cli.synthetic`` (captions like "a red square moving left"; clips come in
mirrored pairs with the same frames in opposite orders; by default 2 colours × 2 shapes × 6 motions = 24 captions,
4 frames per clip, all of which the model sees), then trains, with the same recipe and step budget, on the CPU and
from the same random CLIP weights (nothing is downloaded):

* ``ts2``: TS2-Net (token shift, token selection, temporal transformer, frame-weighted similarity);
* ``meanpool``: the same tiny CLIP with its frame features mean-pooled, no token shift: it sees a clip as a bag
  of frames, so it cannot tell a clip from its mirror image.

Both are scored on held-out clips: text→video R@1 and R@5 within galleries that hold each caption once (720 test
clips make 30 galleries of 24), and the direction accuracy over all 360 held-out mirrored pairs: how often a
caption scores its own clip above the mirrored twin (chance, and all a bag of frames can do: 50%). TS2-Net is
scored three ways: with ts2's default inference (the perturbed top-k it was trained with, the same noise for every
video), with ``--topk hard`` (the plain top-k of the scores), and with the reference's test-time selection
(``--compat official``: the perturbed top-k drawing on from a seeded generator).

    python benchmarks/train_shapes.py                  # about 6 minutes on one thread
    python benchmarks/train_shapes.py --epochs 8       # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ts2cli.datasets import CaptionSet, load_caption_csv
from ts2cli.evaluate import FrameSampler, encode_captions, encode_videos, frame_sampler, similarity_matrix
from ts2cli.model import ModelOptions, load_model, save_checkpoint
from ts2cli.synthetic import MOTION_PAIRS, caption_count, write_shapes_splits
from ts2cli.train import FrameMemory, TrainOptions, TrainProgress, train


def tiny_clip(size: int, grid: int = 4) -> dict[str, Any]:
    """A small ViT: frames of ``size`` pixels in a ``grid``×``grid`` grid of patches, 3 layers of width 64; a 2-layer
    text tower over CLIP's real BPE vocabulary. Random initialisation: the benchmark must run without downloads.

    The default 2×2 grid (4 patches + CLS per frame) suits TS2-Net's fixed K = 3 selected patches. On a 4×4 grid
    the tiny selector's scores saturated (tanh ≈ 1 for every patch), so the hard top-k (``--topk hard``) kept 3
    nearly arbitrary patches of 16 where the perturbed top-k of training had averaged over them all, and scored far
    below it; with 3 of 4 patches the two selections differ much less."""
    return {
        "embed_dim": 64,
        "quick_gelu": True,
        "vision_cfg": {"image_size": size, "layers": 3, "width": 64, "patch_size": size // grid},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2},
    }


def starting_point(model: ModelOptions, position_std: float, path: Path) -> ModelOptions:
    """TS2-Net built as ``ts2 train`` builds it from ``model`` (the same random CLIP, seeded, that the baseline
    starts from; new parts initialised as spec §9 says), except the temporal position table: spec §9 copies it
    from CLIP's text positions, which a random open_clip initialises at std 0.01, 1% of the scale of the frame
    tokens it is added to, and from there the temporal transformer barely learns frame order in this budget.
    Saved as a checkpoint that the ts2 run then trains further."""
    loaded = load_model(model, trainable=True)
    with torch.no_grad():
        loaded.net.temporal.position.weight.normal_(0.0, position_std, generator=torch.Generator().manual_seed(0))
    save_checkpoint(loaded.net, path, loaded.config)
    return dataclasses.replace(model, checkpoint=path, pretrained=None)


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
    """For each caption, the video of its mirrored twin: clips 2k and 2k+1 of the test split (which starts at an
    even clip number) show the same coloured shape with opposite motions."""
    position = {video: i for i, video in enumerate(data.video_ids)}
    twins = []
    for caption, video in zip(data.captions, data.caption_video, strict=True):
        number = int(Path(data.video_ids[video]).stem.removeprefix("clip_"))
        twin = position[f"videos/clip_{number ^ 1:04d}.mp4"]
        twin_caption = data.captions[int(np.flatnonzero(data.caption_video == twin)[0])]
        motion = next(m for m in OPPOSITE if caption.endswith(" " + m))
        assert twin_caption == caption.removesuffix(motion) + OPPOSITE[motion], (caption, twin_caption)
        twins.append(twin)
    return np.array(twins)


def score(
    checkpoint: Path,
    test: CaptionSet,
    frames: int,
    sampler: FrameSampler,
    gallery_size: int,
    selection: str = "default",
) -> dict[str, float]:
    """Held-out t2v R@1 and R@5 within galleries of ``gallery_size`` clips (each caption once), and the direction
    accuracy over all mirrored pairs, with standard errors. ``selection``: "default" (ts2's inference), "hard"
    (``--topk hard``) or "official" (``--compat official``: the reference's test-time noise)."""
    # The frames come from the uniform sampler the model was trained on in every case; with every frame valid the
    # official mask and padding rules change nothing, so "official" differs from "default" by its noise only.
    compat = "official" if selection == "official" else "fixed"
    topk = "hard" if selection == "hard" else "perturbed"
    # fp32, as in training: no reduced-precision choice on the CPU
    options = ModelOptions(
        checkpoint=checkpoint, device="cpu", frames=frames, compat=compat, topk=topk, precision="float32"
    )
    loaded = load_model(options)
    videos = encode_videos(loaded, test.videos, sampler)
    text, _ = encode_captions(loaded, test.captions)
    sim = similarity_matrix(loaded, text, videos)
    hits: dict[str, list[np.ndarray]] = {"R@1": [], "R@5": []}
    for first in range(0, len(test.captions) - gallery_size + 1, gallery_size):
        rows = np.arange(first, first + gallery_size)
        videos_in = test.caption_video[rows]
        gallery = sim[np.ix_(rows, videos_in)]
        # rank = number of gallery clips scored strictly above the right one (ties: the strict rule of ts2 eval)
        rank = (gallery > gallery[np.arange(gallery_size), np.arange(gallery_size)][:, None]).sum(axis=1)
        hits["R@1"].append(rank < 1)
        hits["R@5"].append(rank < 5)
    rows = np.arange(len(test.captions))
    own, twin = sim[rows, test.caption_video], sim[rows, twin_index(test)]
    correct = (own > twin) + 0.5 * (own == twin)
    # The two captions of a pair are not independent: the error comes from the per-pair means.
    per_pair = np.bincount(test.caption_video // 2, weights=correct) / 2
    result = {"pairs": float(len(per_pair)), "captions": float(len(rows))}
    for name, runs in hits.items():
        found = np.concatenate(runs)
        result[name] = float(100 * found.mean())
        result[name + "_se"] = float(100 * found.std() / np.sqrt(len(found)))
    result["direction"] = float(100 * per_pair.mean())
    result["direction_se"] = float(100 * per_pair.std() / np.sqrt(len(per_pair)))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--train", type=int, default=1152, help="training clips (even)")
    parser.add_argument("--test", type=int, default=720, help="held-out clips (a multiple of the caption count)")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--frames", type=int, default=4, help="frames per clip, all given to the model")
    parser.add_argument("--size", type=int, default=32, help="clip and model image size in pixels")
    parser.add_argument("--lr", type=float, default=3e-3, help="lr of the new parts (selector, temporal)")
    parser.add_argument("--clip-lr", type=float, default=3e-3, help="lr of the randomly initialised CLIP")
    parser.add_argument("--colours", default="red,blue", help="caption colours, comma-separated")
    parser.add_argument("--shapes", default="square,ball", help="caption shapes, comma-separated")
    parser.add_argument("--grid", type=int, default=2, help="patches per side of a frame")
    parser.add_argument(
        "--position-std", type=float, default=0.3, help="std of TS2-Net's temporal position table at the start"
    )
    parser.add_argument("--heads", default="ts2,meanpool", help="models to train, comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (one is fastest on shared cores)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = parser.parse_args(argv)
    attributes = {"colours": args.colours.split(","), "shapes": args.shapes.split(",")}
    gallery_size = caption_count(**attributes)
    if args.train % 2 or args.test % gallery_size:
        parser.error(f"--train must be even and --test a multiple of {gallery_size} (the number of captions)")

    torch.set_num_threads(args.threads)

    work = args.out or Path(tempfile.mkdtemp(prefix="ts2-shapes-"))
    started = time.perf_counter()
    # Clips of exactly --frames frames: the uniform sampler returns each of them, so a clip and its mirrored
    # twin give the model the same frames in opposite orders.
    train_csv, test_csv = write_shapes_splits(
        work / "data",
        args.train,
        args.test,
        seed=args.seed,
        size=args.size,
        frames=args.frames,
        fps=args.frames,
        **attributes,
    )
    train_set, test_set = load_caption_csv(train_csv), load_caption_csv(test_csv)
    print(f"data: {len(train_set)} training clips, {len(test_set)} test clips ({time.perf_counter() - started:.0f} s)")

    model = ModelOptions(
        model="tiny-shapes",
        pretrained=None,
        backbone_cfg=tiny_clip(args.size, args.grid),
        device="cpu",
        frames=args.frames,
    )
    starts = {"ts2": starting_point(model, args.position_std, work / "ts2-start.safetensors"), "meanpool": model}
    # Both runs, and the scoring, read the same frames: decode them once.
    frames = FrameMemory(frame_sampler("fixed", args.frames, args.size)[1], budget_bytes=2**31)
    results: dict[str, dict[str, float]] = {}
    for head in args.heads.split(","):
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
        summary = train(starts[head], train_set, options, data_name="shapes", progress=Printer(head), frames=frames)
        seconds = time.perf_counter() - began
        results[head] = {**score(summary.checkpoint, test_set, args.frames, frames, gallery_size), "train_s": seconds}
        if head == "ts2":
            for selection in ("hard", "official"):
                other = score(summary.checkpoint, test_set, args.frames, frames, gallery_size, selection=selection)
                results[f"ts2_{selection}"] = {**other, "train_s": seconds}

    steps = args.epochs * (len(train_set) // args.batch_size)
    pairs = len(test_set) // 2
    chance = {"R@1": 100 / gallery_size, "R@5": 500 / gallery_size, "direction": 50.0}
    galleries = len(test_set) // gallery_size
    print(
        f"\nheld-out: t2v within {galleries} galleries of {gallery_size} clips ({len(test_set)} captions), "
        f"direction over {pairs} mirrored pairs; {steps} steps of {args.batch_size} ({args.epochs} epochs of "
        f"{len(train_set)} clips); ± one standard error"
    )
    print(f"{'model':<36}{'R@1':>12}{'R@5':>12}{'direction':>13}{'train s':>9}")
    names = {
        "ts2": "TS2-Net, ts2's inference",
        "ts2_hard": "TS2-Net, --topk hard",
        "ts2_official": "TS2-Net, --compat official",
        "meanpool": "mean-pooled frames, no shift",
    }
    for head, row in results.items():
        cells = [f"{row[k]:5.1f} ±{row[k + '_se']:4.1f}" for k in ("R@1", "R@5", "direction")]
        print(f"{names[head]:<36}{cells[0]:>12}{cells[1]:>12}{cells[2]:>13}{row['train_s']:9.0f}")
    print(f"{'chance':<36}{chance['R@1']:12.1f}{chance['R@5']:12.1f}{chance['direction']:13.1f}")
    print(f"total {time.perf_counter() - started:.0f} s; data and checkpoints in {work}")
    if args.json:
        print(json.dumps({"results": results, "chance": chance, "args": {k: str(v) for k, v in vars(args).items()}}))


if __name__ == "__main__":
    main()
