"""``ts2 eval``: the official frame sampler, the metric report, the MSR-VTT pipeline with its feature cache, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import tiny_config, tiny_net

from ts2cli.datasets import load_caption_csv, load_msrvtt_test
from ts2cli.errors import Ts2Error
from ts2cli.evaluate import (
    EvalOptions,
    FeatureCache,
    check_msrvtt_dir,
    encode_videos,
    evaluate,
    frame_sampler,
    retrieval_report,
)
from ts2cli.model import ModelOptions, load_model, save_checkpoint
from ts2cli.model.preprocess import frames_to_tensor
from ts2cli.official_sampling import resize_and_crop, sample_official, second_starts, thin_out

SHARED_MSRVTT = Path(__file__).resolve().parents[2] / "shared" / "msrvtt"
MSRVTT_ROWS = 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- official sampling (spec §1.1–1.2) ---------------------------------------------------------------------------


def test_second_starts_reads_the_first_frame_of_each_second():
    assert second_starts(300, 30, 300) == list(range(0, 300, 30))  # 10 s: sec 10 (frame 300) fails
    assert second_starts(301, 30, 301) == list(range(0, 301, 30))  # ceil → 11 s, frame 300 exists
    assert second_starts(300, 30, decodable=250) == list(range(0, 250, 30))  # header promised more
    assert second_starts(0, 30) == [0]  # unknown length: the reference still reads frame 0
    assert second_starts(5, 0) == [0, 1, 2, 3, 4, 5]  # fps < 1 read as 1 (the reference divides by zero)


def test_thin_out_is_numpy_linspace_truncated():
    assert thin_out(12) == list(range(12))
    assert thin_out(5) == [0, 1, 2, 3, 4]
    assert thin_out(15) == [0, 1, 2, 3, 5, 6, 7, 8, 10, 11, 12, 14]
    assert thin_out(30) == np.linspace(0, 29, 12, dtype=int).tolist()


def test_official_sampler_on_real_files(make_video, read_frame_index):
    short = make_video("short.mp4", fps=10, num_frames=35, width=64, height=48)
    sample = sample_official(short.path, size=32)
    assert sample.fps == 10 and sample.frame_numbers == [0, 10, 20, 30]
    assert [read_frame_index(f) for f in sample.frames] == [0, 10, 20, 30]

    # 30 frames at 2 fps: 15 one-per-second frames, thinned to 12 with linspace.
    long = make_video("long.mp4", fps=2, num_frames=30, width=48, height=48)
    sample = sample_official(long.path, size=32)
    expected = [2 * i for i in thin_out(15)]
    assert sample.frame_numbers == expected
    assert [read_frame_index(f) for f in sample.frames] == expected

    # 29.97 fps is truncated to 29, so "one per second" drifts as in the reference.
    ntsc = make_video("ntsc.mp4", fps=29.97, num_frames=70, width=48, height=48)
    assert sample_official(ntsc.path, size=32).frame_numbers == [0, 29, 58]


@pytest.mark.parametrize(("height", "width"), [(48, 80), (61, 37), (32, 32), (24, 30)])
def test_resize_and_crop_equals_open_clip_eval_transform(height, width):
    from open_clip.transform import image_transform
    from PIL import Image

    rgb = np.random.default_rng(height * width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    reference = image_transform(32, is_train=False)(Image.fromarray(rgb))
    ours = frames_to_tensor(resize_and_crop(rgb, 32)[None])[0]
    assert torch.allclose(ours, reference, atol=1e-6)


# --- metric report --------------------------------------------------------------------------------------------


def test_report_with_ties_and_inverted_softmax_by_hand():
    # Caption 0's video ties with another video; caption 2's correct video is beaten by one.
    sim = np.array([[5.0, 5.0, 1.0], [0.0, 3.0, 2.0], [0.0, 4.0, 3.0]])
    targets = np.arange(3)
    strict = retrieval_report(sim, targets)
    assert strict["t2v"]["R@1"] == pytest.approx(200 / 3)  # ranks 0 (tie resolved for the query), 0, 1
    assert strict["t2v"]["MnR"] == pytest.approx(4 / 3)
    # Official tie counting appends caption 0 twice, at ranks 0 and 1: ranks [0, 1, 0, 1].
    official = retrieval_report(sim, targets, ties="official")
    assert official["t2v"]["R@1"] == 50.0 and official["t2v"]["MnR"] == 1.5
    # v2t reads columns: video 1's best caption 1 (3.0) is beaten by caption 0 (5.0) and caption 2 (4.0).
    assert strict["v2t"]["MdR"] == 1.0 and strict["v2t"]["MnR"] == pytest.approx(5 / 3)

    with_dsl = retrieval_report(sim, targets, dsl=True)
    weights = np.exp(sim) / np.exp(sim).sum(axis=0, keepdims=True)
    dsl_ranks = [(row > row[i]).sum() for i, row in enumerate(sim * weights)]
    assert with_dsl["t2v_dsl"]["R@1"] == pytest.approx(100 * np.mean(np.array(dsl_ranks) < 1))
    assert set(with_dsl) == {"t2v", "v2t", "t2v_dsl", "v2t_dsl"}


# --- the MSR-VTT pipeline -------------------------------------------------------------------------------------


@pytest.fixture
def msrvtt_dir(tmp_path, make_video) -> Path:
    """The CLIP4Clip layout with the first rows of the real 1k-A list and generated videos named after its ids
    (one of them as .webm, the loader's fallback)."""
    if not (SHARED_MSRVTT / "MSRVTT_JSFUSION_test.csv").is_file():
        pytest.skip(f"the MSR-VTT lists are not present at {SHARED_MSRVTT}")
    data = tmp_path / "msrvtt"
    (data / "videos").mkdir(parents=True)
    lines = (SHARED_MSRVTT / "MSRVTT_JSFUSION_test.csv").read_text().splitlines()[: MSRVTT_ROWS + 1]
    (data / "MSRVTT_JSFUSION_test.csv").write_text("\n".join(lines) + "\n")
    for row, line in enumerate(lines[1:]):
        video_id = line.split(",")[2]
        suffix = ".webm" if row == 1 else ".mp4"
        make_video(f"msrvtt/videos/{video_id}{suffix}", seconds=1.5 + row, fps=6, texture=True, seed=row)
    return data


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(tiny_net(), path, tiny_config())
    return path


def test_msrvtt_eval_and_feature_cache(msrvtt_dir, tiny_checkpoint, tmp_path):
    data = load_msrvtt_test(msrvtt_dir)
    assert data.videos[1].suffix == ".webm" and len(data.captions) == MSRVTT_ROWS
    loaded = load_model(ModelOptions(checkpoint=tiny_checkpoint, device="cpu"))
    options = EvalOptions(batch_size=3, workers=2, cache_dir=tmp_path / "cache")

    first = evaluate(loaded, data, options)
    assert (first.videos, first.queries) == (MSRVTT_ROWS, MSRVTT_ROWS)
    assert first.cache == {"hits": 0, "decoded": MSRVTT_ROWS, "failed": 0}
    assert set(first.metrics) == {"t2v", "v2t"} and first.sampling.startswith("uniform")

    # Another head setting reads every video's features from the cache: nothing is decoded again.
    second = evaluate(loaded, data, EvalOptions(batch_size=3, cache_dir=tmp_path / "cache", dsl=True, ties="official"))
    assert second.cache == {"hits": MSRVTT_ROWS, "decoded": 0, "failed": 0}
    assert first.dtype in ("float32", "bfloat16") and second.dtype == first.dtype  # the cached features' precision
    assert {"t2v_dsl", "v2t_dsl"} <= set(second.metrics)
    assert retrieval_report_equal(first.metrics["t2v"], evaluate(loaded, data, options).metrics["t2v"])

    # A run pinned to float32 keeps its own features (an "auto" run may have run bf16 on this CPU).
    pinned = load_model(ModelOptions(checkpoint=tiny_checkpoint, device="cpu", precision="float32"))
    pinned_result = evaluate(pinned, data, options)
    assert pinned_result.cache == {"hits": 0, "decoded": MSRVTT_ROWS, "failed": 0}
    assert pinned_result.dtype == "float32" and pinned_result.to_json()["dtype"] == "float32"

    # A cache folder that cannot be made is said up front; one that stops taking files costs only the cache.
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    with pytest.raises(Ts2Error, match=r"Cannot use .*a-file as the feature cache"):
        evaluate(loaded, data, EvalOptions(batch_size=3, cache_dir=not_a_folder))
    entries = tmp_path / "full-cache"
    cache = FeatureCache(entries, loaded, first.sampling, 3)
    cache.directory.rmdir()
    cache.directory.write_text("")  # now nothing can be written there
    cache.save(data.videos[0], np.zeros((2, 4), np.float32), np.ones(2, bool), "float32")
    assert not cache.writable

    # A touched file is a new cache entry.
    stat = data.videos[0].stat()
    os.utime(data.videos[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert evaluate(loaded, data, options).cache == {"hits": MSRVTT_ROWS - 1, "decoded": 1, "failed": 0}


def test_a_run_from_the_cache_gives_the_numbers_of_the_run_that_filled_it(tmp_path, make_video, monkeypatch):
    from ts2cli.model import precision

    if not precision.cpu_has_native_bf16():
        pytest.skip("bf16 is never chosen on a CPU without native bf16")
    monkeypatch.setattr(precision, "BF16_MAX_TIME_RATIO", float("inf"))  # accurate enough is enough: no timing
    rows = ["video,caption"]
    for i in range(8):
        make_video(f"clips/{i}.mp4", seconds=1.5, fps=6, texture=True, seed=i)
        rows += [f"{i}.mp4,{word} number {i} and {j}" for j, word in enumerate(("clip", "shot", "scene", "take") * 6)]
    (tmp_path / "clips" / "captions.csv").write_text("\n".join(rows) + "\n")
    data = load_caption_csv(tmp_path / "clips" / "captions.csv")
    checkpoint = tmp_path / "tiny.safetensors"
    save_checkpoint(tiny_net(), checkpoint, tiny_config())
    options = EvalOptions(batch_size=4, cache_dir=tmp_path / "cache", dsl=True)  # DSL sees every score's value

    first = evaluate(load_model(ModelOptions(checkpoint=checkpoint, device="cpu")), data, options)
    again = evaluate(load_model(ModelOptions(checkpoint=checkpoint, device="cpu")), data, options)
    assert (first.dtype, again.dtype, again.cache["decoded"]) == ("bfloat16", "bfloat16", 0)
    assert first.metrics == again.metrics

    # Resumed after an interruption, on a CPU where the check now turns bf16 down (it depends on a timing): the
    # videos left are embedded in the cache's precision, not in a mix of the two.
    cache = FeatureCache(
        options.cache_dir, load_model(ModelOptions(checkpoint=checkpoint, device="cpu")), first.sampling, 4
    )
    for video in data.videos[5:]:
        cache._file(video).unlink()
    monkeypatch.setattr(precision, "BF16_MIN_COSINE", 2.0)
    resumed = evaluate(load_model(ModelOptions(checkpoint=checkpoint, device="cpu")), data, options)
    assert (resumed.dtype, resumed.cache["decoded"]) == ("bfloat16", 3)
    assert resumed.metrics == first.metrics
    fresh = evaluate(load_model(ModelOptions(checkpoint=checkpoint, device="cpu")), data, EvalOptions(batch_size=4))
    assert fresh.dtype == "float32"  # the check did turn it down


def retrieval_report_equal(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() == b.keys() and all(a[k] == pytest.approx(b[k]) for k in a)


def test_official_mode_features_do_not_depend_on_what_the_cache_held(msrvtt_dir, tiny_checkpoint, tmp_path):
    """Official mode draws top-k noise at inference. A run that an interruption left half cached must give the
    features of a run that was not interrupted."""
    data = load_msrvtt_test(msrvtt_dir)
    loaded = load_model(ModelOptions(checkpoint=tiny_checkpoint, device="cpu", compat="official", precision="float32"))
    sampling, sampler = frame_sampler("official", loaded.config.frames, loaded.image_size)
    cache = FeatureCache(tmp_path / "cache", loaded, sampling, 2)
    whole = encode_videos(loaded, data.videos, sampler, cache=cache, batch_size=2)
    cache._file(data.videos[3]).unlink()  # never written: the run stopped before it
    resumed = encode_videos(loaded, data.videos, sampler, cache=cache, batch_size=2)
    assert (resumed.cached, resumed.decoded) == (2, 2)  # its batch mate is computed again with it
    np.testing.assert_array_equal(resumed.frames, whole.frames)
    uncached = encode_videos(loaded, data.videos, sampler, batch_size=2)
    np.testing.assert_array_equal(uncached.frames, whole.frames)
    assert FeatureCache(tmp_path / "cache", loaded, sampling, 4).key != cache.key  # other batches, other noise


def test_official_compat_uses_the_reference_sampler(msrvtt_dir, tiny_checkpoint):
    data = load_msrvtt_test(msrvtt_dir)
    loaded = load_model(ModelOptions(checkpoint=tiny_checkpoint, device="cpu", compat="official"))
    result = evaluate(loaded, data, EvalOptions(batch_size=4))
    assert result.sampling.startswith("official-1fps") and result.cache["decoded"] == MSRVTT_ROWS
    assert all(np.isfinite(v) for v in result.metrics["t2v"].values())


def test_broken_video_is_reported_and_counts_as_a_miss(msrvtt_dir, tiny_checkpoint):
    data = load_msrvtt_test(msrvtt_dir)
    data.videos[2].write_bytes(b"not a video at all" * 100)
    loaded = load_model(ModelOptions(checkpoint=tiny_checkpoint, device="cpu"))
    result = evaluate(loaded, data, EvalOptions(batch_size=2))
    assert [video for video, _ in result.failed] == [data.video_ids[2]]
    assert result.cache["failed"] == 1 and result.cache["decoded"] == MSRVTT_ROWS - 1
    assert result.metrics["t2v"]["MnR"] >= 1 + (MSRVTT_ROWS - 1) / MSRVTT_ROWS  # its caption ranks last


def test_missing_msrvtt_files_are_named_in_one_message(tmp_path):
    with pytest.raises(Ts2Error) as error:
        check_msrvtt_dir(tmp_path)
    message = str(error.value)
    assert "MSRVTT_JSFUSION_test.csv" in message and "videoNNNN.mp4" in message and str(tmp_path) in message
    with pytest.raises(Ts2Error, match=r"MSRVTT_train\.9k\.csv; MSRVTT_data\.json"):
        check_msrvtt_dir(tmp_path, training=True)
    with pytest.raises(Ts2Error, match="does not exist"):
        check_msrvtt_dir(tmp_path / "nowhere")
    (tmp_path / "captions.csv").write_text("video,caption\n")
    with pytest.raises(Ts2Error, match="is a file, not a folder"):
        check_msrvtt_dir(tmp_path / "captions.csv")


def test_cli_json_schema(tmp_path, make_video, tiny_checkpoint):
    rows = ["video,caption"]
    for i, caption in enumerate(["a dog runs", "a cat sleeps", "a car drives"]):
        make_video(f"clips/{i}.mp4", seconds=1.0 + 0.5 * i, fps=6, seed=i)
        rows.append(f"{i}.mp4,{caption}")
    rows.append("0.mp4,the dog again")  # a second caption of the same video
    (tmp_path / "clips" / "list.csv").write_text("\n".join(rows) + "\n")
    assert len(load_caption_csv(tmp_path / "clips" / "list.csv").videos) == 3

    args = ["--csv", str(tmp_path / "clips" / "list.csv"), "--checkpoint", str(tiny_checkpoint), "--device", "cpu"]
    args += ["--cache-dir", str(tmp_path / "cache"), "--dsl", "--json"]
    command = [sys.executable, "-m", "ts2cli", "eval", "captions", *args]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["videos"], report["queries"]) == (3, 4)
    for direction in ("t2v", "v2t", "t2v_dsl", "v2t_dsl"):
        assert {"R@1", "R@5", "R@10", "MdR", "MnR"} <= report[direction].keys()
    assert report["transductive"] == ["t2v_dsl", "v2t_dsl"] and report["failed"] == []
    assert report["truncated_captions"] == 0 and "cut to fit" not in result.stderr

    # a caption longer than the text tower reads is cut, as the reference does, and the table's run says so
    rows.append("1.mp4," + " and".join(["a cat"] * 40))
    (tmp_path / "clips" / "list.csv").write_text("\n".join(rows) + "\n")
    table = subprocess.run(command[:-1], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert table.returncode == 0 and "1 caption was longer than the model reads: cut to fit" in table.stderr
