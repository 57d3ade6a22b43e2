"""The library's text encoder in numpy, so that ``ts2 search`` answers without importing torch.

Importing torch takes 2-4 s on the test machine, more than everything else a text search does. The library
therefore keeps a copy of its model's text tower (``text-encoder.safetensors``, float16, written by ``ts2 index``
and by the first search that loads the model with torch) and ``ts2 search`` runs it here: CLIP's causal
transformer over the query's tokens, the EOT token's features, the text projection. Only OpenAI-style text towers
with QuickGELU are exported (what TS2-Net is built on); any other model is searched through torch as before.

The copy is used only when the identity it records equals the library's model, so it can never answer for
another model; tests check that its query vectors match the torch model's.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from . import tokenizer
from .cores import available_cores
from .store import DB_FILE, Library, same_model
from .tokenizer import encode

FILE_NAME = "text-encoder.safetensors"
FORMAT = "ts2-text/1"
LAYER_NORM_EPS = 1e-5
BLOCK_ROWS = 128
"""Weight rows per matrix product (32 to 128 were equally fast here; 256 and whole weights slower)."""
MAX_THREADS = 2
"""Threads sharing each product's weight blocks. On the 2-core test machine two took 0.74-0.82× the time of one per
query in 13 paired runs with the second vCPU free, 1.05-1.09× while another program kept it busy
(docs/benchmarks.md, Search); more threads were never measured."""
_TEXT_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


def default_threads() -> int:
    """One thread per core this process may use, up to ``MAX_THREADS``."""
    return max(1, min(MAX_THREADS, available_cores()))


@dataclass(frozen=True)
class TextEncoder:
    """CLIP's text tower as float32 arrays; ``encode_texts`` gives the query vectors the torch model would."""

    weights: dict[str, np.ndarray]
    heads: int
    layers: int
    words: int
    identity: dict[str, Any]
    threads: int = field(default_factory=default_threads)

    def encode_texts(self, texts: list[str]) -> tuple[np.ndarray, list[bool]]:
        """(B, D) float32 text features and, per text, whether it was cut to the context length."""
        tokens = encode(texts, self.words)
        ids = tokens.ids
        eot = ids.argmax(axis=1)
        length = int(eot.max()) + 1  # the causal mask makes later positions irrelevant (as in TS2Net.encode_text)
        w = self.weights
        x = w["token_embedding.weight"][ids[:, :length]].astype(np.float32) + w["positional_embedding"][:length]
        mask = np.triu(np.full((length, length), -np.inf, dtype=np.float32), 1)
        for layer in range(self.layers - 1):
            x = self._block(x, f"transformer.resblocks.{layer}.", mask)
        # Only the EOT token's output is used: the last block needs every token's keys and values, but the
        # rest of its work (three quarters of its weights' products) only for that token.
        x = self._block(x, f"transformer.resblocks.{self.layers - 1}.", mask, rows=eot)[:, 0]
        x = _layer_norm(x, w["ln_final.weight"], w["ln_final.bias"])
        return x @ w["text_projection"], tokens.truncated

    def _block(self, x: np.ndarray, prefix: str, mask: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """One residual attention block over (B, L, W); with ``rows`` (B,), only those positions' outputs (B, 1, W)."""
        w = self.weights
        batch, _, width = x.shape
        head = width // self.heads
        y = _layer_norm(x, w[prefix + "ln_1.weight"], w[prefix + "ln_1.bias"])
        qkv = self._linear(y, prefix + "attn.in_proj_")
        q, k, v = (part.reshape(batch, -1, self.heads, head).transpose(0, 2, 1, 3) for part in np.split(qkv, 3, -1))
        if rows is not None:
            picked = np.arange(batch), rows
            x, q, mask = x[picked][:, None], q[picked[0], :, rows][:, :, None], mask[rows][:, None, None]
        scores = q @ k.transpose(0, 1, 3, 2) * head**-0.5 + mask
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        attended = (scores / scores.sum(-1, keepdims=True)) @ v
        attended = attended.transpose(0, 2, 1, 3).reshape(x.shape)
        x = x + self._linear(attended, prefix + "attn.out_proj.")
        y = _layer_norm(x, w[prefix + "ln_2.weight"], w[prefix + "ln_2.bias"])
        y = self._linear(y, prefix + "mlp.c_fc.")
        y = y / (1.0 + np.exp(-1.702 * y))  # QuickGELU: y · sigmoid(1.702 y)
        return x + self._linear(y, prefix + "mlp.c_proj.")

    def _linear(self, x: np.ndarray, prefix: str) -> np.ndarray:
        """``x @ weight.T + bias`` for a few rows, computed as ``weight @ x.T`` over blocks of ``BLOCK_ROWS`` rows of
        the weight: the time goes into reading the weight, and OpenBLAS reads it 30% faster that way round and
        17% faster again in blocks (it copies a large operand into its own layout first; small blocks presumably
        take its small-matrix path instead; docs/benchmarks.md, Search). The blocks are shared between
        ``threads`` threads (numpy lets go of the GIL inside a product; each runs one OpenBLAS thread, whose own
        threading spins and stalls on a busy machine: see ts2cli/cli.py), as ``_SharedProduct`` describes."""
        weight, bias = self.weights[prefix + "weight"], self.weights[prefix + "bias"]
        product = _SharedProduct(weight, np.ascontiguousarray(x.reshape(-1, x.shape[-1]).T))
        for _ in range(min(self.threads, product.blocks) - 1):
            _helper_pool(self.threads - 1).submit(product.help)
        out = product.compute()
        # C order: the small operations between the products take 2-3× longer on transposed arrays
        return np.add(out.T, bias, order="C").reshape(*x.shape[:-1], weight.shape[0])


class _SharedProduct:
    """``weight @ columns`` in blocks of ``BLOCK_ROWS`` weight rows, handed out one at a time to whichever thread
    asks first, so that a thread slowed down by other programs takes fewer of them.

    The calling thread waits for a helper's last block no longer than it took for two blocks of its own; then it
    computes the missing blocks itself, into a copy the helper does not write to. On the shared test VM the
    second vCPU sometimes stalled for milliseconds without any steal time showing, and an earlier version that
    waited for it ran some queries 2.5× slower than one thread (docs/benchmarks.md, Search).
    """

    def __init__(self, weight: np.ndarray, columns: np.ndarray) -> None:
        self.weight, self.columns = weight, columns
        self.out = np.empty((weight.shape[0], columns.shape[1]), dtype=np.float32)
        self.blocks = -(-weight.shape[0] // BLOCK_ROWS)
        self._starts = iter(range(0, weight.shape[0], BLOCK_ROWS))
        self._unfinished: set[int] = set()
        """Blocks a helper took and has not finished."""
        self._finished = threading.Condition()

    def compute(self) -> np.ndarray:
        """The product, computed by the calling thread with whatever help it gets."""
        began, done = time.perf_counter(), 0
        while (start := self._take(helper=False)) is not None:
            self._multiply(start, self.out)
            done += 1
        patience = 2 * (time.perf_counter() - began) / max(done, 1)
        with self._finished:
            self._finished.wait_for(lambda: not self._unfinished, timeout=patience)
            late = sorted(self._unfinished)
        if not late:
            return self.out
        out = self.out.copy()
        for start in late:
            self._multiply(start, out)
        return out

    def help(self) -> None:
        """Compute blocks until none is left (run on helper threads)."""
        while (start := self._take(helper=True)) is not None:
            self._multiply(start, self.out)
            with self._finished:
                self._unfinished.discard(start)
                if not self._unfinished:
                    self._finished.notify_all()

    def _take(self, *, helper: bool) -> int | None:
        with self._finished:
            start = next(self._starts, None)
            if helper and start is not None:
                self._unfinished.add(start)
            return start

    def _multiply(self, start: int, out: np.ndarray) -> None:
        np.matmul(self.weight[start : start + BLOCK_ROWS], self.columns, out=out[start : start + BLOCK_ROWS])


@cache
def _helper_pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="ts2-text")


if hasattr(os, "register_at_fork"):  # a forked child has none of its parent's threads: it makes its own pool
    os.register_at_fork(after_in_child=_helper_pool.cache_clear)


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    width = x.shape[-1]
    centred = x - np.add.reduce(x, -1, keepdims=True) / width
    variance = np.add.reduce(centred * centred, -1, keepdims=True) / width
    centred /= np.sqrt(variance + LAYER_NORM_EPS)
    centred *= weight
    centred += bias
    return centred


def path_for(library: Library) -> Path:
    return library.directory / FILE_NAME


def load_text_encoder(library: Library) -> TextEncoder | None:
    """The library's exported text encoder, or None when there is none for the library's current model."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    meta = _current_metadata(library)
    if meta is None:
        return None
    tokenizer.prepare_in_background()  # Python work, overlapping the weights' reading and widening (no GIL)
    try:
        # The token table stays float16: a query reads a few of its rows.
        arrays = load_file(str(path_for(library)))
        weights = {k: v if k.startswith("token_") else v.astype(np.float32) for k, v in arrays.items()}
        identity = json.loads(meta["identity"])
        return TextEncoder(weights, int(meta["heads"]), int(meta["layers"]), int(meta["words"]), identity)
    except (OSError, KeyError, ValueError, SafetensorError):
        return None  # unreadable or from another ts2: the torch path answers, and rewrites it


def is_current(library: Library) -> bool:
    """Whether the library holds an exported text encoder for its current model."""
    return _current_metadata(library) is not None


def _current_metadata(library: Library) -> dict[str, str] | None:
    from safetensors import SafetensorError
    from safetensors.numpy import safe_open

    path, stored = path_for(library), library.model_config()
    if stored is None or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="np") as handle:
            meta = handle.metadata() or {}
        current = meta.get("format") == FORMAT and same_model(json.loads(meta["identity"]), stored)
    except (OSError, KeyError, ValueError, SafetensorError):
        return None
    return meta if current else None


def exportable(loaded: Any) -> bool:
    """Whether ``loaded`` (a ``LoadedModel``) has a text tower this module reproduces."""
    from .model import text_tower

    cfg = loaded.config.backbone_cfg or {}
    return bool(loaded.config.quick_gelu) and text_tower.supports(cfg)


def save_text_encoder(library: Library, loaded: Any) -> bool:
    """Write the text tower of ``loaded`` (fp32 weights, before any bf16 cast) for torch-free searches; returns
    whether it was written. Replaces the file atomically, so a search never reads half of it."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    if not exportable(loaded) or (loaded.dtype is not None and loaded.device.type == "cpu"):
        return False
    clip = loaded.net.clip
    state = {
        key: tensor.detach().float().cpu().numpy().astype(np.float16)
        for key, tensor in clip.state_dict().items()
        if key.startswith(_TEXT_PREFIXES)
    }
    text_cfg = (loaded.config.backbone_cfg or {}).get("text_cfg", {})
    meta = {
        "format": FORMAT,
        "identity": json.dumps(loaded.identity, sort_keys=True),
        "heads": str(text_cfg.get("heads", 8)),
        "layers": str(text_cfg.get("layers", 12)),
        "words": str(loaded.config.words),
    }
    path = path_for(library)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(state, str(temporary), metadata=meta)
        # readable by whoever can read the library (safetensors creates files private to their owner)
        os.chmod(temporary, (library.directory / DB_FILE).stat().st_mode & 0o666)
        os.replace(temporary, path)
    except (OSError, SafetensorError):
        return False  # a read-only or full disk: searches still work, through torch
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink()
    return True
