"""CLIP's BPE tokenizer (open_clip's ``SimpleTokenizer``), usable without importing torch.

A text search should not wait for torch (2-4 s to import on the test machine) just to split a sentence into
tokens. open_clip's tokenizer module needs nothing from torch to encode text; it imports torch only to return
tensors and to annotate its functions. So the module is executed from its file with ``import torch`` answered by
a placeholder, unless torch is already loaded, in which case the real one is used. Encoding is open_clip's own
code either way (tests compare the ids with open_clip's on the MSR-VTT captions).
"""

from __future__ import annotations

import builtins
import contextlib
import importlib.util
import os
import sys
import threading
import types
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np


class _TorchPlaceholder(types.ModuleType):
    """Stands in for torch while open_clip's tokenizer module is defined: any attribute is a plain type, which is
    enough for annotations such as ``-> torch.LongTensor``; nothing here ever builds a tensor with it."""

    def __getattr__(self, name: str) -> Any:
        return object


def _import_without_torch(name: str, *args: Any, **kwargs: Any) -> Any:
    if name == "torch" and "torch" not in sys.modules:
        return _TorchPlaceholder("torch")
    return builtins.__import__(name, *args, **kwargs)


@cache
def _clip_tokenizer_module() -> types.ModuleType:
    """open_clip's tokenizer module without running ``open_clip/__init__`` (which imports the model zoo) or
    importing torch. The BPE vocabulary is found next to the module, as usual."""
    loaded = sys.modules.get("open_clip.tokenizer")
    if loaded is not None:
        return loaded
    package = importlib.util.find_spec("open_clip")
    if package is None or package.origin is None:
        raise ImportError("open_clip is not installed")
    spec = importlib.util.spec_from_file_location(
        "ts2cli._clip_tokenizer", Path(package.origin).parent / "tokenizer.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    module.__dict__["__builtins__"] = {**vars(builtins), "__import__": _import_without_torch}
    spec.loader.exec_module(module)
    return module


_building = threading.Lock()


def _unlock_after_fork() -> None:
    # A fork taken while a background build held the lock would leave it held for good in the child.
    global _building
    _building = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_unlock_after_fork)


def prepare_in_background() -> threading.Thread:
    """Start building the tokenizer on a thread of its own (0.3 s of Python on the test machine), so that it
    overlaps work that lets go of the GIL, such as reading the text encoder's weights. ``encode`` waits for it;
    an error is raised there, where the tokenizer is built again."""
    thread = threading.Thread(target=_build_quietly, name="ts2-tokenizer", daemon=True)
    thread.start()
    return thread


def _build_quietly() -> None:
    with contextlib.suppress(Exception):
        _tokenizer()


def _tokenizer() -> Any:
    with _building:  # one build, even with a background one under way
        return _built_tokenizer()


@cache
def _built_tokenizer() -> Any:
    # The module builds a default SimpleTokenizer when it is executed (its ``tokenize`` uses it); building a
    # second one would read and parse the BPE vocabulary again (0.15 s, an eighth of a cold `ts2 search`).
    module = _clip_tokenizer_module()
    built = getattr(module, "_tokenizer", None)
    return built if isinstance(built, module.SimpleTokenizer) else module.SimpleTokenizer()


@dataclass(frozen=True)
class TokenIds:
    ids: np.ndarray
    """(B, words) int64: SOT, content, EOT, zero padding."""
    truncated: list[bool]
    """Whether each text lost content tokens to the context length."""


def encode(texts: list[str], words: int) -> TokenIds:
    """Texts as CLIP token ids at ``words`` positions; a longer text keeps its first ``words - 2`` content tokens
    and still ends with EOT (open_clip's rule for truncation)."""
    tokenizer = _tokenizer()
    sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
    ids = np.zeros((len(texts), words), dtype=np.int64)
    truncated = []
    for row, text in enumerate(texts):
        content = tokenizer.encode(text)
        truncated.append(len(content) > words - 2)
        tokens = [sot, *content[: words - 2], eot]
        ids[row, : len(tokens)] = tokens
    return TokenIds(ids, truncated)
