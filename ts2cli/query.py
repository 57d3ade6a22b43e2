"""Turning what the user typed (a text or an example video) into one query vector, with the library's model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .errors import LibraryError, Ts2Error
from .store import MODEL_SOURCE_KEY, Library, same_model

if TYPE_CHECKING:  # torch is imported only when a model is loaded: a text search may not need it at all
    from .model import LoadedModel, ModelOptions


class TextModel(Protocol):
    """What encodes a query: the torch model (``LoadedModel``) or the library's ONNX copy (``TextEncoder``)."""

    @property
    def words(self) -> int: ...

    def encode_texts(self, texts: list[str]) -> tuple[np.ndarray, list[bool]]: ...


def load_library_model(
    library: Library, options: ModelOptions | None, *, device: str = "auto", text_only: bool = True
) -> LoadedModel:
    """The library's own model (from its recorded source), or ``options`` if given and the same model."""
    import torch

    from .model import load_model
    from .model.loading import options_from_source

    stored = library.model_config()
    if stored is None:
        raise LibraryError(f"The library at {library.directory} has no model yet; run `ts2 index FOLDER` first.")
    if options is None:
        if MODEL_SOURCE_KEY not in stored:
            raise LibraryError("The library does not record its model; pass --model/--pretrained/--checkpoint.")
        options = options_from_source(stored[MODEL_SOURCE_KEY], device)
    if text_only:
        # One 32-token query is too small to split: on the shared 2-core test machine one thread encoded it in
        # 182 ms (median) against 657 ms with two (benchmarks/search_bench.py).
        torch.set_num_threads(1)
    model = load_model(options, text_only=text_only)
    if not same_model(model.identity, stored):
        raise LibraryError(
            f"The library at {library.directory} was built with another model ({describe(stored)}); "
            "search it with that model, or re-index with `ts2 index --rebuild`."
        )
    if text_only:
        from . import text_encoder

        if not text_encoder.is_current(library):
            text_encoder.save_text_encoder(library, model)  # the next text search can then answer without torch
        model.reduce_text_precision()
    return model


def describe(identity: dict[str, Any]) -> str:
    weights = identity.get("checkpoint") or identity.get("clip_weights")
    return f"{identity.get('backbone')} {weights}, {identity.get('mode')}, {identity.get('frames')} frames"


def text_query(model: TextModel, text: str) -> tuple[np.ndarray, list[str]]:
    """Query vector for a description, and notes for the user (e.g. truncation)."""
    if not text.strip():
        raise Ts2Error('The query is empty; describe what happens, e.g. ts2 search "dog catching a frisbee".')
    vectors, truncated = model.encode_texts([text])
    words = model.words - 2
    notes = [f"The query was cut to its first {words} tokens, as much as the model reads."] if truncated[0] else []
    return vectors[0], notes


def video_query(library: Library, model_for_video: LoadedModel | None, path: Path) -> tuple[np.ndarray, int | None]:
    """Query vector for an example video: its stored features when indexed, else decoded and embedded now.
    Returns the library id of the video too, so it can be left out of its own results."""
    from .decode import sample_frames  # PyAV is not needed for text queries: imported here, not at start-up
    from .indexer import KEYFRAME_SNAP, global_vector

    path = Path(path).expanduser()
    if not path.is_file():
        raise Ts2Error(f"No such video: {path}")
    row = library.get_by_path(str(path.resolve()))
    if row is not None and row.status == "ok":
        frames = library.frame_features([row.id]).get(row.id)
        if frames is not None:
            return global_vector(frames), row.id
    if model_for_video is None:
        raise Ts2Error("A model is needed to embed this video.")
    # sampled exactly as the indexer samples, so an indexed copy of this file has the same features
    sampled = sample_frames(
        path, model_for_video.config.frames, model_for_video.image_size, keyframe_snap=KEYFRAME_SNAP
    )
    features, mask = model_for_video.encode_videos([sampled.frames])
    return global_vector(features[0][mask[0]]), None
