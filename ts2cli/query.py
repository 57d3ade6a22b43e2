"""Turning what the user typed (a text or an example video) into one query vector, with the library's model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .errors import LibraryError, Ts2Error
from .model_record import MODEL_SOURCE_KEY, file_fingerprint, model_summary, record_topk, same_model
from .store import Library, VideoRow, printable_path

if TYPE_CHECKING:  # torch is imported only when a model is loaded: a text search may not need it at all
    from .model import LoadedModel, ModelOptions


class TextModel(Protocol):
    """What encodes a query: the torch model (``LoadedModel``) or the library's ONNX copy (``TextEncoder``)."""

    @property
    def words(self) -> int: ...

    def encode_texts(self, texts: list[str]) -> tuple[np.ndarray, list[bool]]: ...


def load_library_model(
    library: Library,
    options: ModelOptions | None,
    *,
    device: str = "auto",
    text_only: bool = True,
    precision: str = "auto",
) -> LoadedModel:
    """The library's own model (from its recorded source, run at ``precision``), or ``options`` if given and the
    same model."""
    from dataclasses import replace

    import torch

    from .model import load_model
    from .model.loading import options_from_source

    stored = _stored_model(library)
    recorded = options is None
    if options is None:
        if MODEL_SOURCE_KEY not in stored:
            raise LibraryError("The library does not record its model; pass --model/--pretrained/--checkpoint.")
        options = replace(options_from_source(stored[MODEL_SOURCE_KEY], device), precision=precision)
    if text_only:
        # One 32-token query is too small to split: on the shared 2-core test machine one thread encoded it in
        # 182 ms (median) against 657 ms with two (benchmarks/search_bench.py).
        torch.set_num_threads(1)
    if recorded:
        _check_recorded_files(stored, options)
    model = load_model(options, text_only=text_only)
    if not same_model(model.identity, stored):
        raise LibraryError(
            f"The library at {library.directory} was built with another model, {model_summary(stored)}; "
            "search it with that model, or re-index with `ts2 index --rebuild`."
        )
    if text_only:
        from . import text_encoder

        if not text_encoder.is_current(library):
            text_encoder.save_text_encoder(library, model)  # the next text search can then answer without torch
        model.reduce_text_precision()
    return model


def _stored_model(library: Library) -> dict[str, Any]:
    stored = library.model_config()
    if stored is None:
        raise LibraryError(f"The library at {library.directory} has no model yet; run `ts2 index FOLDER` first.")
    return stored


def _check_recorded_files(stored: dict[str, Any], options: ModelOptions) -> None:
    """A one-line error naming the option to use when the local file the library's model came from is gone (a
    weights file named by a tag, e.g. openai, is downloaded again instead)."""
    if options.checkpoint is not None:
        path, option = options.checkpoint, "--checkpoint"
    elif file_fingerprint(stored.get("clip_weights")) is not None and options.weights_file is not None:
        path, option = options.weights_file, "--pretrained"
    else:
        return
    if not path.exists():
        raise LibraryError(
            f"The library's model was loaded from {path}, which is no longer there; "
            f"if it moved, pass its new place with {option} NEW/PATH."
        )


def search_model_options(
    library: Library,
    device: str,
    *,
    model: ModelOptions | None = None,
    pretrained: str | None = None,
    checkpoint: Path | None = None,
) -> ModelOptions:
    """The library's model with what the user named on the command line instead: ``model`` (its name and
    config), ``pretrained`` (e.g. the weights file's new place), ``checkpoint``. Compat mode and frame count are
    always the library's: they are part of what its vectors mean."""
    from dataclasses import replace

    from .model import ModelOptions
    from .model.loading import options_from_source

    stored = _stored_model(library)
    source = stored.get(MODEL_SOURCE_KEY)
    if source:
        base = options_from_source(source, device)
    else:
        topk = record_topk(stored)
        base = ModelOptions(device=device, compat=stored.get("compat"), frames=stored.get("frames"), topk=topk)
    changes: dict[str, Any] = {}
    if model is not None:
        changes |= {"model": model.model, "backbone_cfg": model.backbone_cfg, "quick_gelu": None}
    if pretrained is not None:
        changes |= {"pretrained": pretrained, "weights_file": None, "quick_gelu": None}
    if checkpoint is not None:
        changes["checkpoint"] = checkpoint
    return replace(base, **changes)


def text_query_vector(
    library: Library, text: str, options: ModelOptions | None, *, device: str = "auto"
) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """Query vector for a description, notes for the user, and the identity of the model behind the vector.

    The library's ONNX copy of its text tower answers without importing torch; a model given on the command line
    (or a library without a usable copy) is loaded through torch, checked against the library's and copied for
    the next search if need be, and then the copy answers all the same (on the CPU)."""
    from . import text_encoder

    encoder = text_encoder.load_text_encoder(library) if options is None and device in ("auto", "cpu") else None
    if encoder is not None:
        vector, notes = text_query(encoder, text)
        if np.isfinite(vector).all():
            return vector, notes, encoder.identity
        text_encoder.discard(library)  # damaged in place (its metadata intact): the torch model replaces it
    model = load_library_model(library, options, device=device, text_only=True)
    # Checked to be the library's model (or just copied from it), the copy answers as it answers every other
    # search: the same query gets the same scores whether or not the model was named.
    encoder = text_encoder.load_text_encoder(library) if device in ("auto", "cpu") else None
    vector, notes = text_query(encoder if encoder is not None else model, text)
    if not np.isfinite(vector).all():
        raise Ts2Error(f"The model gave no usable vector for this query (not finite): {model_summary(model.identity)}.")
    return vector, notes, model.identity


def text_query(model: TextModel, text: str) -> tuple[np.ndarray, list[str]]:
    """Query vector for a description, and notes for the user (e.g. truncation)."""
    if not any(character.isprintable() and not character.isspace() for character in text):
        raise Ts2Error('The query is empty; describe what happens, e.g. ts2 search "dog catching a frisbee".')
    vectors, truncated = model.encode_texts([text])
    words = model.words - 2
    notes = [f"The query was cut to its first {words} tokens, as much as the model reads."] if truncated[0] else []
    return vectors[0], notes


def like_query(
    library: Library, path: Path, options: ModelOptions | None, *, device: str = "auto"
) -> tuple[np.ndarray, int | None, dict[str, Any]]:
    """Query vector for an example video, the library id to leave out of its own results (None when the video is
    not indexed), and the identity of the model behind the vector.

    An indexed video's stored features are the query, and no model is loaded unless ``options`` names one (which
    must then be the library's model); any other video is decoded and embedded now."""
    from .search import global_vector

    path = example_video(path)
    row = indexed_row(library, path)
    frames = library.frame_features([row.id]).get(row.id) if row is not None else None
    if frames is not None:
        if options is None:
            return global_vector(frames), row.id, library.model_config() or {}
        loaded = load_library_model(library, options, device=device, text_only=True)
        return global_vector(frames), row.id, loaded.identity
    loaded = load_library_model(library, options, device=device, text_only=False)
    return embed_example(loaded, path), None, loaded.identity


def embed_example(model: LoadedModel, path: Path) -> np.ndarray:
    """The global vector of a video that is not in the library, sampled exactly as the indexer samples, so that
    an indexed copy of the same file has the same features."""
    # torch and PyAV only now: an indexed example needs neither
    from .decode import VideoDecodeError, sample_frames
    from .indexer import KEYFRAME_SNAP
    from .search import global_vector

    try:
        sampled = sample_frames(path, model.config.frames, model.image_size, keyframe_snap=KEYFRAME_SNAP)
    except VideoDecodeError as error:
        raise Ts2Error(f"{printable_path(path)}: {error}") from error
    return global_vector(model.encode_frames([sampled.frames])[0])


def example_video(path: Path) -> Path:
    """``path`` (``~`` expanded) if it is a file, else a one-line error; checked before any model is loaded."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise Ts2Error(f"{path} is a folder; --like takes one video file.")
    if not path.is_file():
        raise Ts2Error(f"No such video: {path}")
    return path


def indexed_row(library: Library, path: Path) -> VideoRow | None:
    """The library's row for the file at ``path`` if it was indexed successfully."""
    row = library.get_by_path(str(Path(path).resolve()))
    return row if row is not None and row.status == "ok" else None
