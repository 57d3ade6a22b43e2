"""The torch-free query path: CLIP's tokenizer without torch, the library's ONNX copy of its text tower, numpy
re-ranking, and a `ts2 search` that never imports torch."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import TINY_CLIP, tiny_net

from ts2cli import text_encoder
from ts2cli.indexer import IndexOptions, index_folders
from ts2cli.model import ModelOptions, frame_weighted_similarity, load_model
from ts2cli.query import text_query
from ts2cli.search import score_videos
from ts2cli.store import Library
from ts2cli.tokenizer import encode

MSRVTT_CSV = Path(__file__).resolve().parents[2] / "shared" / "msrvtt" / "MSRVTT_JSFUSION_test.csv"
TEXTS = [
    "a dog catches a frisbee",
    "Two people DANCE in a kitchen!!  ",
    "café — naïve résumé, 42 times",
    "a very long description of everything that happens " * 4,
    "",
]


def captions() -> list[str]:
    if not MSRVTT_CSV.is_file():
        return TEXTS
    with MSRVTT_CSV.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return TEXTS + [row["sentence"] for row in rows[:300]]


def test_tokenizer_matches_open_clip_and_needs_no_torch():
    import open_clip

    texts = captions()
    ours = encode(texts, 32)
    reference = open_clip.tokenizer.SimpleTokenizer(context_length=32)(texts).numpy()
    assert np.array_equal(ours.ids, reference)
    assert ours.truncated[3] and not ours.truncated[0]
    probe = "import sys; from ts2cli.tokenizer import encode; encode(['a dog'], 32); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "False"


def test_tokenizer_is_built_once_and_in_background(monkeypatch):
    from ts2cli import tokenizer

    tokenizer.prepare_in_background().join()
    # the instance open_clip's module builds for itself: the vocabulary is not parsed a second time
    assert tokenizer._tokenizer() is tokenizer._clip_tokenizer_module()._tokenizer

    def broken() -> None:
        raise ImportError("open_clip is not installed")

    uncaught = []
    monkeypatch.setattr(threading, "excepthook", uncaught.append)
    monkeypatch.setattr(tokenizer, "_built_tokenizer", broken)
    tokenizer.prepare_in_background().join()
    assert uncaught == []  # no traceback from the thread: the error is raised where the tokenizer is needed
    with pytest.raises(ImportError, match="open_clip is not installed"):
        encode(["a dog"], 32)


def test_numpy_scores_equal_the_model_similarity():
    """Each video against the model's function on that video alone: with padding, the official formula (eps=None)
    would give NaN for every shorter video of a batch; the search scores must not depend on batch-mates."""
    rng = np.random.default_rng(0)
    videos = [rng.normal(size=(n, 16)).astype(np.float32) for n in (1, 3, 12, 7, 12)]
    query = rng.normal(size=16).astype(np.float32)
    for eps in (1e-12, None):
        scores, weights = score_videos(query, videos, eps=eps)
        for i, video in enumerate(videos):
            expected, expected_weights = frame_weighted_similarity(
                torch.from_numpy(query[None]), torch.from_numpy(video[None]), torch.ones(1, len(video)), eps=eps
            )
            np.testing.assert_allclose(scores[i], expected[0, 0].item(), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(weights[i, : len(video)], expected_weights[0, 0].numpy(), rtol=1e-5, atol=1e-6)
            assert np.all(weights[i, len(video) :] == 0)
    half = score_videos(query, [v.astype(np.float16) for v in videos])[0]
    np.testing.assert_allclose(half, score_videos(query, [v.astype(np.float16).astype(np.float32) for v in videos])[0])


@pytest.fixture
def indexed(tmp_path):
    """A library indexed with a tiny CLIP whose weights come from a local file, as a user's would."""
    from conftest import write_video

    (tmp_path / "videos").mkdir()
    for i in range(4):
        write_video(tmp_path / "videos" / f"v{i}.mp4", seconds=2, fps=6, width=48, height=32, texture=True, seed=i)
    weights = tmp_path / "tiny.pt"
    torch.save({k.removeprefix("clip."): v for k, v in tiny_net(zero_shot=True, seed=3).state_dict().items()}, weights)
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_CLIP))
    options = ModelOptions(model="tiny", backbone_cfg=TINY_CLIP, pretrained=str(weights), device="cpu", frames=4)
    with Library.open(tmp_path / "lib", write=True, create=True) as lib:
        index_folders(lib, load_model(options), IndexOptions(roots=[tmp_path / "videos"]))
    return tmp_path, options


def test_index_exports_a_text_encoder_that_gives_the_torch_query_vectors(indexed):
    root, options = indexed
    with Library.open(root / "lib") as lib:
        assert text_encoder.is_current(lib)
        encoder = text_encoder.load_text_encoder(lib)
        assert encoder is not None and encoder.identity == lib.model_config()
    model = load_model(options, text_only=True)  # fp32 torch reference
    texts = captions()[:40]
    ours, truncated = encoder.encode_texts(texts)
    reference, reference_truncated = model.encode_texts(texts)
    assert truncated == reference_truncated and ours.dtype == np.float32
    cosine = (ours * reference).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(reference, axis=-1)
    assert cosine.min() > 0.9999  # float16 weights
    np.testing.assert_allclose(ours, reference, rtol=0.02, atol=2e-3)
    vector, notes = text_query(encoder, "a very long description " * 10)
    assert vector.shape == (model.embed_dim,) and "first 30 tokens" in notes[0]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_fork_during_a_tokenizer_build_does_not_lock_the_child():
    import time

    from ts2cli import tokenizer

    tokenizer._tokenizer()
    with tokenizer._building:  # as if a background build were under way when the fork comes
        pid = os.fork()
        if pid == 0:
            os._exit(0 if tokenizer._tokenizer() is not None else 1)
    deadline = time.monotonic() + 30
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    assert done[0] == pid and os.waitstatus_to_exitcode(done[1]) == 0


def test_one_thread_gives_the_vectors_of_two(indexed):
    with Library.open(indexed[0] / "lib") as lib:
        alone, shared = (text_encoder.load_text_encoder(lib, threads=n) for n in (1, 2))
    assert alone is not None and shared is not None and (alone.threads, shared.threads) == (1, 2)
    np.testing.assert_allclose(shared.encode_texts(TEXTS)[0], alone.encode_texts(TEXTS)[0], rtol=1e-5, atol=1e-6)
    assert 1 <= text_encoder.default_threads() <= text_encoder.MAX_THREADS


def test_an_export_for_another_model_is_not_used(indexed):
    import onnx

    root, _ = indexed
    path = root / "lib" / text_encoder.FILE_NAME
    exported = onnx.load(str(path))
    props = {p.key: p.value for p in exported.metadata_props}
    identity = json.loads(props["identity"]) | {"frames": 12}
    onnx.helper.set_model_props(exported, props | {"identity": json.dumps(identity)})
    onnx.save_model(exported, str(path))
    with Library.open(root / "lib") as lib:
        assert text_encoder.load_text_encoder(lib) is None and not text_encoder.is_current(lib)
    path.write_bytes(b"not an ONNX file")
    with Library.open(root / "lib") as lib:
        assert text_encoder.load_text_encoder(lib) is None and not text_encoder.is_current(lib)


def test_without_onnx_runtime_the_copy_is_neither_read_nor_written(indexed, monkeypatch):
    root, options = indexed
    model = load_model(options, text_only=True)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an interpreter without it does: ImportError
    with Library.open(root / "lib", write=True) as lib:
        assert text_encoder.load_text_encoder(lib) is None and not text_encoder.is_current(lib)
        assert not text_encoder.save_text_encoder(lib, model)


def test_writing_the_copy_removes_an_older_ts2s_copy(indexed):
    root, options = indexed
    old = root / "lib" / "text-encoder.safetensors"
    old.write_bytes(b"numpy-era copy")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = root / "lib" / f".{text_encoder.FILE_NAME}.{dead.stdout.strip()}.tmp"  # a run killed while writing
    killed.write_bytes(b"half a copy")
    running = root / "lib" / f".{text_encoder.FILE_NAME}.{os.getppid()}.tmp"  # another process, still writing
    running.write_bytes(b"a copy on its way")
    (root / "lib" / text_encoder.FILE_NAME).unlink()
    with Library.open(root / "lib", write=True) as lib:
        assert text_encoder.save_text_encoder(lib, load_model(options, text_only=True))
        assert text_encoder.is_current(lib)
    assert not old.exists() and not killed.exists() and running.exists()


SEARCH_AND_REPORT = """
import json, sys
from ts2cli.cli import app
app(sys.argv[1:], standalone_mode=False)
print(json.dumps({"torch": "torch" in sys.modules}))
"""


def run_search(library: Path, *extra: str) -> tuple[dict, bool]:
    args = ["search", "a dog", "--library", str(library), "--json", "--limit", "4", *extra]
    result = subprocess.run([sys.executable, "-c", SEARCH_AND_REPORT, *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    output, imported = result.stdout.strip().rsplit("\n", 1)
    return json.loads(output), json.loads(imported)["torch"]


def test_text_search_runs_without_torch_and_ranks_as_the_torch_path(indexed):
    root, _ = indexed
    library = root / "lib"
    fast, torch_loaded = run_search(library)
    assert not torch_loaded and len(fast["results"]) == 4
    (library / text_encoder.FILE_NAME).unlink()
    slow, torch_loaded = run_search(library, "--device", "cpu")
    assert torch_loaded and (library / text_encoder.FILE_NAME).is_file()  # rewritten for the next search
    assert [r["path"] for r in fast["results"]] == [r["path"] for r in slow["results"]]
    assert fast["model"] == slow["model"]
    # the torch path writes the copy, which then answers as it does for every search: the same scores
    assert [r["score"] for r in fast["results"]] == [r["score"] for r in slow["results"]]


def test_a_copy_damaged_in_place_is_replaced_through_torch(indexed):
    import onnx

    from ts2cli.query import text_query_vector

    root, _ = indexed
    copy = root / "lib" / text_encoder.FILE_NAME
    with Library.open(root / "lib") as lib:
        expected, _, _ = text_query_vector(lib, "a red square", None, device="cpu")
        # the bytes of its weights overwritten (0xffff is a float16 NaN), its structure and metadata intact
        graph = onnx.load(str(copy))
        for weight in graph.graph.initializer:
            if weight.data_type == onnx.TensorProto.FLOAT16:
                weight.raw_data = b"\xff" * len(weight.raw_data)
        onnx.save_model(graph, str(copy))
        damaged = copy.read_bytes()
        encoder = text_encoder.load_text_encoder(lib)
        assert encoder is not None and not np.isfinite(encoder.encode_texts(["a red square"])[0]).all()
        vector, _, identity = text_query_vector(lib, "a red square", None, device="cpu")
        assert identity == lib.model_config()
        # the copy written again from the torch model answers
        assert float(vector @ expected) / float(np.linalg.norm(vector) * np.linalg.norm(expected)) > 0.999
        assert copy.read_bytes() != damaged and text_encoder.is_current(lib)  # written again
        repaired = text_encoder.load_text_encoder(lib)
        assert repaired is not None and np.isfinite(repaired.encode_texts(["a red square"])[0]).all()


def test_a_library_from_before_whole_file_digests_keeps_its_copy_until_indexed_then_gets_a_new_one(indexed):
    import onnx

    from ts2cli.scan import fingerprint

    root, options = indexed
    weights, copy = Path(options.pretrained), root / "lib" / text_encoder.FILE_NAME
    # the library and its copy as an earlier ts2 wrote them: the weights named by a sampled fingerprint
    with Library.open(root / "lib", write=True) as lib:
        old = lib.model_config() | {"clip_weights": f"{weights.name}#{fingerprint(weights)[:16]}"}
        lib.set_model_config(old)
        lib.commit()
    exported = onnx.load(str(copy))
    props = {p.key: p.value for p in exported.metadata_props}
    onnx.helper.set_model_props(exported, props | {"identity": json.dumps(old, sort_keys=True)})
    onnx.save_model(exported, str(copy))
    with Library.open(root / "lib") as lib:
        assert text_encoder.load_text_encoder(lib) is not None  # searches still answer without torch

    with Library.open(root / "lib", write=True) as lib:  # the next index records the digest, and a new copy
        index_folders(lib, load_model(options), IndexOptions(roots=[root / "videos"]))
    weights.rename(weights.with_name("moved.pt"))  # a copy that matches the record needs no weights file
    with Library.open(root / "lib") as lib:
        assert "#sha256:" in lib.model_config()["clip_weights"]
        encoder = text_encoder.load_text_encoder(lib)
        assert encoder is not None and encoder.identity["clip_weights"] == lib.model_config()["clip_weights"]
