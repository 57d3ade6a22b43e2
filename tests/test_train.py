"""``ts2 train``: the recipe's parts by hand, gradient caching, a short run that learns, resume equivalence."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import TINY_CLIP, tiny_net
from typer.testing import CliRunner

import ts2cli.train as train_module
from ts2cli.cli import app
from ts2cli.datasets import CaptionSet, load_caption_csv
from ts2cli.errors import CheckpointError, Ts2Error, VideoDecodeError
from ts2cli.evaluate import EvalOptions, evaluate, frame_sampler
from ts2cli.model import LoadedModel, ModelOptions, load_model, read_checkpoint
from ts2cli.model.preprocess import tokenize
from ts2cli.synthetic import write_shapes_dataset
from ts2cli.train import (
    FROZEN,
    STATE_FILE,
    BertAdam,
    Trainer,
    TrainOptions,
    TrainProgress,
    TrainSummary,
    WarmupCosine,
    clip_to_fp16,
    epoch_items,
    freeze_embeddings,
    interrupted_note,
    param_groups,
    train,
)

TINY = ModelOptions(model="tiny", pretrained=None, backbone_cfg=TINY_CLIP, device="cpu", frames=4)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> CaptionSet:
    """Eight captioned moving-shape clips (four mirrored pairs), 32 px."""
    return load_caption_csv(write_shapes_dataset(tmp_path_factory.mktemp("shapes"), 8, seed=0, size=32, frames=8))


# --- recipe parts ---------------------------------------------------------------------------------------------


def test_warmup_cosine_matches_the_reference_log():
    schedule = WarmupCosine(7030, 0.1)
    assert schedule(0) == 0.0  # the first update uses lr 0
    assert 1e-4 * schedule(50) == pytest.approx(7.112e-6, rel=1e-3)  # the log at step 50
    assert 1e-7 * schedule(50) == pytest.approx(7.1e-9, rel=2e-3)
    assert schedule(703) == pytest.approx(0.5 * (1 + math.cos(0.1 * math.pi)))  # no renormalisation: 0.976
    assert schedule(7029) == pytest.approx(0.0, abs=1e-6)


def test_bert_adam_by_hand():
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    bias = torch.nn.Parameter(torch.tensor([0.5]))
    optimizer = BertAdam([{"params": [param], "weight_decay": 0.2}, {"params": [bias], "weight_decay": 0.0}], lr=0.1)
    m = v = np.zeros(2)
    p = np.array([1.0, -2.0])
    for grad in ([0.5, -1.0], [0.25, 2.0]):
        param.grad = torch.tensor(grad)
        bias.grad = torch.tensor([1.0])
        optimizer.step()
        m = 0.9 * m + 0.1 * np.array(grad)
        v = 0.98 * v + 0.02 * np.array(grad) ** 2
        p = p - 0.1 * (m / (np.sqrt(v) + 1e-6) + 0.2 * p)  # no bias correction, decoupled decay
        assert param.detach().numpy() == pytest.approx(p, rel=1e-6)
    assert bias.item() == pytest.approx(
        0.5 - 0.1 * (0.1 / (math.sqrt(0.02) + 1e-6) + 0.19 / (math.sqrt(0.0396) + 1e-6))
    )


def test_param_groups_freezing_and_fp16_storage():
    net = tiny_net()
    freeze_embeddings(net)
    frozen = {name for name, p in net.named_parameters() if not p.requires_grad}
    assert frozen == set(FROZEN)
    groups = param_groups(net, lr=1e-4, clip_lr=1e-7, weight_decay=0.2)
    names = {id(p): n for n, p in net.named_parameters()}
    for group in groups:
        for param in group["params"]:
            name = names[id(param)]
            assert group["lr"] == (1e-7 if name.startswith("clip.") else 1e-4), name
            assert group["weight_decay"] == (0.0 if "bias" in name else 0.2), name
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in net.parameters())

    clip_to_fp16(net.clip)
    dtypes = {name: p.dtype for name, p in net.named_parameters()}
    for half in ("clip.visual.conv1.weight", "clip.visual.proj", "clip.text_projection"):
        assert dtypes[half] == torch.float16
    assert dtypes["clip.visual.transformer.resblocks.0.attn.in_proj_weight"] == torch.float16
    assert dtypes["clip.transformer.resblocks.0.mlp.c_fc.bias"] == torch.float16
    for full in ("clip.visual.ln_pre.weight", "clip.visual.class_embedding", "clip.token_embedding.weight"):
        assert dtypes[full] == torch.float32
    assert dtypes["clip.logit_scale"] == torch.float32 and dtypes["temporal.position.weight"] == torch.float32


def test_epoch_order_is_a_function_of_seed_and_epoch(shapes):
    assert epoch_items(shapes, 3, 1) == epoch_items(shapes, 3, 1)
    assert epoch_items(shapes, 3, 1) != epoch_items(shapes, 3, 2)
    per_video = dataclasses.replace(shapes, expanded=False)
    items = epoch_items(per_video, 3, 0)
    assert sorted(v for v, _ in items) == list(range(len(shapes.videos)))
    assert all(shapes.caption_video[c] == v for v, c in items)


# --- gradient caching -----------------------------------------------------------------------------------------


def _batch(shapes: CaptionSet, trainer: Trainer):
    from ts2cli.evaluate import frame_sampler

    _, sampler = frame_sampler("fixed", 4, 32)
    pixels, mask = trainer.loaded.video_batch([sampler(path) for path in shapes.videos])
    return tokenize(shapes.captions).ids, pixels, mask


@pytest.mark.parametrize("head", ["ts2", "meanpool"])
def test_micro_batches_give_the_gradients_of_one_big_batch(shapes, tmp_path, head):
    net = tiny_net(spread_scores=False, frames=4, zero_shot=head == "meanpool")
    loaded = LoadedModel(net=net, config=net.config, device=torch.device("cpu"), identity={})
    options = TrainOptions(out_dir=tmp_path, batch_size=8, micro_batch=3, head=head)
    trainer = Trainer(loaded, shapes, options)
    ids, pixels, mask = _batch(shapes, trainer)

    # Reference: one graph over the whole batch, micro-batches encoded with the same top-k noise.
    chunks = [slice(0, 3), slice(3, 6), slice(6, 8)]
    encoded = [(net.encode_text(ids[c]), *trainer.encode_chunk(pixels[c], mask[c], i)) for i, c in enumerate(chunks)]
    text, frames, frame_mask = (torch.cat(parts) for parts in zip(*encoded, strict=True))
    expected_loss = trainer_loss(trainer, text, frames, frame_mask)
    expected_loss.backward()
    expected = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    trainer.optimizer.zero_grad(set_to_none=True)

    loss = trainer.backward(ids, pixels, mask)
    assert loss == pytest.approx(expected_loss.item(), rel=1e-5)
    grads = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
    assert grads.keys() == expected.keys() and "clip.logit_scale" in grads
    for name, grad in grads.items():
        # Equal up to float summation order, relative to each tensor's scale.
        assert (grad - expected[name]).abs().max() <= 1e-5 * expected[name].abs().max(), name


def trainer_loss(trainer: Trainer, text, frames, mask) -> torch.Tensor:
    from ts2cli.model import symmetric_infonce

    return symmetric_infonce(trainer.logits(text, frames, mask))


# --- whole runs -----------------------------------------------------------------------------------------------


class Recorder(TrainProgress):
    def __init__(self, stop_after: int | None = None) -> None:
        self.losses: list[float] = []
        self.lrs: list[float] = []
        self.stop_after = stop_after

    def step_done(self, loss: float, lr: float) -> None:
        self.losses.append(loss)
        self.lrs.append(lr)

    def epoch_done(self, record) -> None:
        if record.epoch == self.stop_after:
            raise KeyboardInterrupt  # as if the run were killed after this epoch's checkpoint


def test_short_run_learns(shapes, tmp_path):
    options = TrainOptions(
        out_dir=tmp_path / "run", epochs=8, batch_size=4, micro_batch=4, lr=2e-3, clip_lr=2e-3, warmup=0.05, seed=1
    )
    progress = Recorder()
    summary = train(TINY, shapes, options, eval_data=shapes, progress=progress)
    assert len(progress.losses) == 16 and progress.lrs[0] == 0.0
    assert np.mean(progress.losses[-4:]) < 0.8 * np.mean(progress.losses[:4])
    assert summary.epochs[-1].metrics is not None and summary.best_epoch is not None
    # The last checkpoint is a TS2-Net that `ts2 index --checkpoint` loads as such.
    loaded = load_model(ModelOptions(checkpoint=summary.checkpoint, device="cpu", frames=4))
    assert loaded.identity["mode"] == "ts2net" and loaded.config.provenance["epoch"] == 8
    # The last epoch's evaluation scored the trained weights themselves (no copy taken at an earlier epoch).
    pinned = load_model(ModelOptions(checkpoint=summary.checkpoint, device="cpu", frames=4, precision="float32"))
    final = evaluate(pinned, shapes, EvalOptions(batch_size=4, workers=1), sampler=frame_sampler("fixed", 4, 32)[1])
    assert final.metrics["t2v"] == summary.epochs[-1].metrics["t2v"]
    assert all((tmp_path / "run" / f"epoch-{n}.safetensors").is_file() for n in range(1, 9))


def test_evaluation_between_epochs_cannot_swap_in_a_reduced_copy(shapes, tmp_path):
    """On a CPU with native bf16 the first evaluation could otherwise settle the model's precision by replacing
    ``loaded.net`` with a bf16 copy, which later epochs would not update."""
    loaded = load_model(TINY, trainable=True)
    trainer = Trainer(loaded, shapes, TrainOptions(out_dir=tmp_path / "run", epochs=1, batch_size=4))
    assert loaded.precision_known and loaded.dtype is None and loaded.net is trainer.net


def test_resume_continues_exactly(shapes, tmp_path):
    options = TrainOptions(out_dir=tmp_path / "straight", epochs=2, batch_size=4, micro_batch=2, lr=1e-3, seed=5)
    straight = train(TINY, shapes, options)

    interrupted = dataclasses.replace(options, out_dir=tmp_path / "resumed")
    assert "start over" in interrupted_note(interrupted.out_dir)  # nothing saved yet
    with pytest.raises(KeyboardInterrupt):
        train(TINY, shapes, interrupted, progress=Recorder(stop_after=1))
    assert "continue with --resume" in interrupted_note(interrupted.out_dir)
    with pytest.raises(Ts2Error, match="--resume"):
        train(TINY, shapes, interrupted)
    with pytest.raises(Ts2Error, match="lr"):
        train(TINY, shapes, dataclasses.replace(interrupted, resume=True, lr=5e-4))
    resumed = train(TINY, shapes, dataclasses.replace(interrupted, resume=True))

    assert [e.loss for e in resumed.epochs] == [e.loss for e in straight.epochs]
    _, a = read_checkpoint(straight.checkpoint)
    _, b = read_checkpoint(resumed.checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_clip_fp16_step_keeps_fp16_weights(shapes, tmp_path):
    options = TrainOptions(out_dir=tmp_path, epochs=1, batch_size=4, micro_batch=4, clip_lr=1e-3, clip_fp16=True)
    summary = train(TINY, shapes, options)
    assert math.isfinite(summary.epochs[0].loss)
    _, state = read_checkpoint(summary.checkpoint)
    assert state["clip.visual.proj"].dtype == torch.float16 and state["temporal.position.weight"].dtype == torch.float32


def test_cli_train_then_eval(shapes, tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_CLIP))
    csv = shapes.videos[0].parents[1] / "captions.csv"
    model = ["--model", str(config), "--pretrained", "none", "--device", "cpu", "--frames", "4", "--json"]
    runner = CliRunner()
    run = ["--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "4", "--eval-csv", str(csv)]
    trained = runner.invoke(app, ["train", "captions", "--csv", str(csv), *run, *model, "--compat", "official"])
    assert trained.exit_code == 0, trained.output
    summary = json.loads(trained.stdout)
    assert summary["last_epoch"] == 1 and summary["epochs"][0]["metrics"]["t2v"]["R@1"] >= 0
    described = runner.invoke(app, ["model", "--checkpoint", summary["checkpoint"], "--device", "cpu", "--json"])
    trained_record = json.loads(described.stdout)["trained"]  # what ts2 train recorded, for ts2 model to show
    assert (trained_record["epoch"], trained_record["data"]) == (1, str(csv))
    assert trained_record["eval"] == summary["epochs"][0]["metrics"]
    shown = runner.invoke(app, ["model", "--checkpoint", summary["checkpoint"], "--device", "cpu"])
    assert "epoch 1 (" in shown.stdout and "held-out t2v R@1" in shown.stdout

    # fine-tuning a checkpoint further keeps its compat mode and frame count unless told otherwise
    again = [
        "--out",
        str(tmp_path / "again"),
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--checkpoint",
        summary["checkpoint"],
    ]
    tuned = runner.invoke(app, ["train", "captions", "--csv", str(csv), *again, *model[:6], "--json"])
    assert tuned.exit_code == 0, tuned.output
    assert "--model and --pretrained are not used with --checkpoint" in tuned.stderr  # said, not silently dropped
    tuned_config, _ = read_checkpoint(json.loads(tuned.stdout)["checkpoint"])
    assert (tuned_config.compat, tuned_config.frames) == ("official", 4)

    # --resume of a complete run trains nothing and says so; the model options are not read again, and it says so
    resumed = runner.invoke(
        app, ["train", "captions", "--csv", str(csv), *run, *model, "--compat", "official", "--resume"]
    )
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["resumed_from"] == 1 and json.loads(resumed.stdout)["epochs"] == summary["epochs"]
    assert "--model and --pretrained are not read again with --resume" in resumed.stderr
    assert "was already complete (1 epoch): nothing was trained or evaluated" in " ".join(resumed.stderr.split())
    assert summary["resumed_from"] is None

    scored = runner.invoke(
        app, ["eval", "captions", "--csv", str(csv), "--checkpoint", summary["checkpoint"], "--no-cache", *model]
    )
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.stdout)["queries"] == len(shapes.captions)


# --- interruptions, failures and reproducibility ---------------------------------------------------------------

RESUMABLE = {"epochs": 2, "batch_size": 4, "micro_batch": 2, "lr": 1e-3, "seed": 5}


@pytest.fixture(scope="module")
def straight(shapes, tmp_path_factory) -> TrainSummary:
    """Two epochs without a stop: what every interrupted-then-resumed run below must end with."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests' own runs (one_torch_thread): float sums in the same order
    try:
        return train(TINY, shapes, TrainOptions(out_dir=tmp_path_factory.mktemp("straight") / "run", **RESUMABLE))
    finally:
        torch.set_num_threads(threads)


def assert_same_weights(a: TrainSummary, b: TrainSummary) -> None:
    _, first = read_checkpoint(a.checkpoint)
    _, second = read_checkpoint(b.checkpoint)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("epoch", [1, 2])
@pytest.mark.parametrize(
    ("when", "name"),
    [("after", "epoch-{}.safetensors"), ("before", "last.safetensors"), ("after", "last.safetensors")],
    ids=["after-epoch-file", "before-last", "after-last"],
)
def test_an_interrupted_save_leaves_a_run_that_continues_exactly(
    shapes, tmp_path, monkeypatch, straight, epoch, when, name
):
    """A SIGINT anywhere in an epoch's save: the files left behind resume as if nothing had happened."""
    real_save, real_copy = train_module.save_checkpoint, train_module._replace_with_copy
    stop_at = name.format(epoch)

    def stopping(real, path, saved_epoch: int, *args) -> None:
        # The real save runs; only the interruption is added, at the chosen moment of the chosen epoch.
        here = path.name == stop_at and saved_epoch == epoch
        if here and when == "before":
            raise KeyboardInterrupt
        real(*args)
        if here and when == "after":
            raise KeyboardInterrupt

    def save_and_stop(net, path, config) -> None:
        stopping(real_save, path, config.provenance["epoch"], net, path, config)

    def copy_and_stop(source, target) -> None:  # last.safetensors is published from the epoch file
        stopping(real_copy, target, int(source.stem.removeprefix("epoch-")), source, target)

    options = TrainOptions(out_dir=tmp_path / "run", **RESUMABLE)
    monkeypatch.setattr(train_module, "save_checkpoint", save_and_stop)
    monkeypatch.setattr(train_module, "_replace_with_copy", copy_and_stop)
    with pytest.raises(KeyboardInterrupt):
        train(TINY, shapes, options)
    monkeypatch.undo()

    if epoch == 1 and stop_at == "epoch-1.safetensors":
        # Nothing was committed: --resume says so, and a plain run starts over in the same folder.
        with pytest.raises(Ts2Error, match="start without --resume"):
            train(TINY, shapes, dataclasses.replace(options, resume=True))
        finished = train(TINY, shapes, options)
    else:
        finished = train(TINY, shapes, dataclasses.replace(options, resume=True))
    assert [e.loss for e in finished.epochs] == [e.loss for e in straight.epochs]
    assert_same_weights(finished, straight)


def test_running_out_of_memory_names_the_option(shapes, tmp_path):
    def out_of_memory(module, inputs) -> None:
        # Only the allocator's answer is made up: a test cannot safely run a real device out of memory.
        if isinstance(module, torch.nn.Conv2d):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    options = TrainOptions(out_dir=tmp_path / "run", epochs=1, batch_size=4, micro_batch=2)
    hook = torch.nn.modules.module.register_module_forward_pre_hook(out_of_memory)
    try:
        with pytest.raises(
            Ts2Error, match=r"^Out of memory training on 4 videos, 2 at a time, on cpu: .*--micro-batch"
        ):
            train(TINY, shapes, options)
        with pytest.raises(Ts2Error, match=r"^Out of memory encoding a batch of 3 videos on cpu: .*--batch-size"):
            evaluate(load_model(TINY), shapes, EvalOptions(batch_size=3))
    finally:
        hook.remove()


def test_same_seed_gives_identical_checkpoints(shapes, tmp_path):
    """From CLIP weights the new parts are initialised at random: the seed must decide how."""
    weights = tmp_path / "tiny.pt"
    torch.save({k.removeprefix("clip."): v for k, v in tiny_net(zero_shot=True).state_dict().items()}, weights)
    model = dataclasses.replace(TINY, pretrained=str(weights))
    options = TrainOptions(out_dir=tmp_path / "a", epochs=1, batch_size=4, micro_batch=4, seed=3)
    first = train(model, shapes, options)
    torch.rand(100)  # whatever the global RNG holds before a run must not matter
    second = train(model, shapes, dataclasses.replace(options, out_dir=tmp_path / "b"))
    assert_same_weights(first, second)


def test_clip_fp16_run_evaluates_on_the_cpu(shapes, tmp_path):
    options = TrainOptions(
        out_dir=tmp_path / "run", epochs=2, batch_size=4, micro_batch=4, clip_lr=1e-3, clip_fp16=True
    )
    summary = train(TINY, shapes, options, eval_data=shapes)
    assert all(e.metrics is not None for e in summary.epochs)
    # The evaluation gave the weights back in fp16, still the optimiser's, and the checkpoint records its metrics.
    _, first = read_checkpoint(tmp_path / "run" / "epoch-1.safetensors")
    config, last = read_checkpoint(summary.checkpoint)
    assert last["clip.visual.proj"].dtype == torch.float16
    assert not torch.equal(first["clip.visual.proj"], last["clip.visual.proj"])
    assert config.provenance["eval"] == summary.epochs[-1].metrics
    assert summary.checkpoint.read_bytes() == (tmp_path / "run" / "epoch-2.safetensors").read_bytes()


class StopInEvaluation(TrainProgress):
    def start(self, description: str, total: int) -> None:
        raise KeyboardInterrupt  # as if the run were killed while the first evaluation runs


def test_an_interrupted_evaluation_loses_no_training(shapes, tmp_path, straight):
    options = TrainOptions(out_dir=tmp_path / "run", **RESUMABLE)
    with pytest.raises(KeyboardInterrupt):
        train(TINY, shapes, options, eval_data=shapes, progress=StopInEvaluation())
    resumed = train(TINY, shapes, dataclasses.replace(options, resume=True), eval_data=shapes)
    assert [e.steps for e in resumed.epochs] == [2, 4]  # epoch 1 was kept, not trained again
    assert_same_weights(resumed, straight)
    # and its interrupted evaluation was done when the run went on, as an uninterrupted run does it
    assert all(e.metrics is not None for e in resumed.epochs) and resumed.best_epoch is not None
    first_config, _ = read_checkpoint(resumed.epochs[0].checkpoint)
    assert first_config.provenance["eval"] == resumed.epochs[0].metrics


def test_an_epoch_without_a_step_is_an_error(tmp_path):
    rng = np.random.default_rng(0)
    for name in "abcd":
        (tmp_path / f"{name}.mp4").write_bytes(rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())
    (tmp_path / "list.csv").write_text("video,caption\n" + "".join(f"{n}.mp4,clip {n}\n" for n in "abcd"))
    data = load_caption_csv(tmp_path / "list.csv")
    out = tmp_path / "run"
    with pytest.raises(VideoDecodeError, match="could not run a single step"):
        train(TINY, data, TrainOptions(out_dir=out, epochs=1, batch_size=2))
    assert not out.exists()  # the run made the folder and saved nothing in it: not left behind
    out.mkdir()
    with pytest.raises(VideoDecodeError, match="could not run a single step"):
        train(TINY, data, TrainOptions(out_dir=out, epochs=1, batch_size=2))
    assert out.is_dir() and not list(out.iterdir())  # a folder the user made stays


def test_resume_from_a_corrupt_state_is_a_one_line_error(shapes, tmp_path):
    options = TrainOptions(out_dir=tmp_path / "run", epochs=1, batch_size=4, micro_batch=4)
    train(TINY, shapes, options)
    state_file = tmp_path / "run" / STATE_FILE
    whole = state_file.read_bytes()
    state = torch.load(state_file, weights_only=True)
    del state["recipe"]
    torch.save(state, tmp_path / "no-recipe.pt")
    for broken in (whole[: len(whole) // 2], b"not a state file", (tmp_path / "no-recipe.pt").read_bytes()):
        state_file.write_bytes(broken)
        with pytest.raises(CheckpointError, match=STATE_FILE) as error:
            train(TINY, shapes, dataclasses.replace(options, resume=True))
        assert "\n" not in str(error.value)


def test_out_that_is_a_file_is_refused_up_front(shapes, tmp_path):
    (tmp_path / "run").write_text("not a folder")
    progress = Recorder()
    with pytest.raises(Ts2Error, match="--out"):
        train(TINY, shapes, TrainOptions(out_dir=tmp_path / "run", epochs=1, batch_size=4), progress=progress)
    assert progress.losses == []


def test_resume_may_change_the_micro_batch_only(shapes, tmp_path):
    options = TrainOptions(out_dir=tmp_path / "run", **RESUMABLE)
    with pytest.raises(KeyboardInterrupt):
        train(TINY, shapes, options, progress=Recorder(stop_after=1))
    with pytest.raises(Ts2Error, match="other settings \\(--clip-lr, --lr\\)"):
        train(TINY, shapes, dataclasses.replace(options, resume=True, lr=5e-4, clip_lr=1e-3))
    swapped = dataclasses.replace(shapes, captions=[*shapes.captions[1:], shapes.captions[0]])  # as many items
    with pytest.raises(Ts2Error, match="other settings \\(data \\(other videos or captions"):
        train(TINY, swapped, dataclasses.replace(options, resume=True))
    moved = dataclasses.replace(shapes, videos=[Path("/elsewhere") / video.name for video in shapes.videos])
    assert moved.digest() == shapes.digest()  # where the files lie is not part of the data
    resumed = train(TINY, shapes, dataclasses.replace(options, resume=True, micro_batch=4))
    assert [e.steps for e in resumed.epochs] == [2, 4] and math.isfinite(resumed.epochs[-1].loss)


def test_cli_train_reports_missing_videos(shapes, tmp_path):
    listed = shapes.videos[0].parents[1] / "captions.csv"
    csv = tmp_path / "with-ghost.csv"
    csv.write_text(listed.read_text() + "ghost.mp4,a ghost\n")
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_CLIP))
    model = ["--model", str(config), "--pretrained", "none", "--device", "cpu", "--frames", "4", "--json"]
    # an evaluation list with a video that cannot be decoded
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    held_out = tmp_path / "held-out.csv"
    held_out.write_text(listed.read_text() + f"{tmp_path / 'broken.mp4'},a broken clip\n")
    run = ["--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "4", "--allow-missing"]
    run += ["--eval-csv", str(held_out), "--eval-videos", str(listed.parent)]
    trained = CliRunner().invoke(
        app, ["train", "captions", "--csv", str(csv), "--videos", str(listed.parent), *run, *model]
    )
    assert trained.exit_code == 0, trained.output
    summary = json.loads(trained.stdout)
    assert summary["missing"] == ["ghost.mp4"] and summary["eval_missing"] == []
    assert [failure["video"] for failure in summary["eval_failed"]] == [str(tmp_path / "broken.mp4")]
    config_, _ = read_checkpoint(summary["checkpoint"])
    assert config_.provenance["missing_videos"] == 1


def test_batches_that_failures_leave_with_one_video_are_not_trained_on(shapes, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    videos = list(shapes.videos)
    for index in (1, 2, 5, 6):
        videos[index] = broken / f"{index}.mp4"
        videos[index].write_bytes(b"not a video %d" % index)
    damaged = dataclasses.replace(shapes, videos=videos)
    told: list[str] = []

    class Listening(Recorder):
        def failed(self, name: str, reason: str) -> None:
            told.append(name)

    options = TrainOptions(out_dir=tmp_path / "run", epochs=2, batch_size=2, micro_batch=2, lr=1e-3, seed=3)
    progress = Listening()
    summary = train(TINY, damaged, options, eval_data=damaged, progress=progress)
    assert progress.losses and all(loss > 0 for loss in progress.losses)  # a batch of one has loss 0
    assert len(progress.losses) < 2 * 4  # some batches kept one video: no step for them
    assert sorted(told) == sorted(map(str, (videos[i] for i in (1, 2, 5, 6))))  # once each, over two evaluations
    assert len(summary.failed) == 4 and len(summary.eval_failed) == 4


def test_a_run_that_diverges_stops_with_the_epochs_before_kept(shapes, tmp_path):
    options = TrainOptions(out_dir=tmp_path / "run", epochs=2, batch_size=4, micro_batch=4, lr=float("inf"), warmup=0)
    with pytest.raises(Ts2Error, match=r"Training diverged: the loss is nan at step \d+ \(epoch 1\); lower --lr"):
        train(TINY, shapes, options)
    assert not (tmp_path / "run" / "last.safetensors").exists()  # nothing diverged was saved as an epoch


def test_json_output_is_strict_when_a_number_is_not_finite(capsys):
    from ts2cli.cli import print_json

    print_json({"epochs": [{"loss": float("nan"), "lr": float("inf")}], "seconds": 1.5})
    assert json.loads(capsys.readouterr().out) == {"epochs": [{"loss": None, "lr": None}], "seconds": 1.5}
