"""The library's text encoder on ONNX Runtime, so that ``ts2 search`` answers without importing torch.

Importing torch takes 2-4 s on the test machine, more than everything else a text search does. The library
therefore keeps a copy of its model's text tower (``text-encoder.onnx``, float16 weights, written by ``ts2 index``
and by the first search that loads the model with torch) and ``ts2 search`` runs it on ONNX Runtime: CLIP's causal
transformer over the query's tokens, the EOT token's features, the text projection. Only OpenAI-style text towers
with QuickGELU are exported (what TS2-Net is built on); any other model is searched through torch as before.

Why ONNX Runtime: a query is a handful of tokens, so each of the tower's weight products is a skinny one, and the
time goes into reading 151 MB of fp32 weights. ONNX Runtime repacks each weight once, when the session is made,
and a query's skinny products then take about 1.5× one read of the weights on one core (24 against 16.4 ms on
the test machine), and 15-16 ms for a 10-12 token query on two threads, where numpy's OpenBLAS took 33-41 ms
(docs/benchmarks.md, Search).

The copy is used only when the identity it records equals the library's model, so it can never answer for
another model; tests check that its query vectors match the torch model's.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import tokenizer
from .cores import available_cores
from .model_record import same_record
from .store import DB_FILE, Library
from .tokenizer import encode

if TYPE_CHECKING:
    import onnx
    import onnxruntime

FILE_NAME = "text-encoder.onnx"
OLD_FILE_NAMES = ("text-encoder.safetensors",)
"""Copies written by earlier versions of ts2 (numpy's): removed when a new copy is written."""
FORMAT = "ts2-text/2"
OPSET = 17
"""The first opset with LayerNormalization; with IR version 8 any ONNX Runtime from 1.14 on can load it."""
IR_VERSION = 8
LAYER_NORM_EPS = 1e-5
QUICK_GELU_SCALE = 1.702
MAX_THREADS = 2
"""Threads for ONNX Runtime's products. On the 2-core test machine two took 0.61-0.70× the time of one per query
in 7 of 8 paired rounds, 0.95-1.19× while another program kept the second vCPU busy (docs/benchmarks.md, Search);
more threads were never measured."""
_TEXT_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


def default_threads() -> int:
    """One thread per core this process may use, up to ``MAX_THREADS``."""
    return max(1, min(MAX_THREADS, available_cores()))


@dataclass(frozen=True)
class TextEncoder:
    """CLIP's text tower in an ONNX Runtime session; ``encode_texts`` gives the query vectors the torch model would."""

    session: onnxruntime.InferenceSession
    words: int
    identity: dict[str, Any]

    @property
    def threads(self) -> int:
        return self.session.get_session_options().intra_op_num_threads

    def encode_texts(self, texts: list[str]) -> tuple[np.ndarray, list[bool]]:
        """(B, D) float32 text features and, per text, whether it was cut to the context length."""
        tokens = encode(texts, self.words)
        eot = tokens.ids.argmax(axis=1)
        length = int(eot.max()) + 1  # the causal mask makes later positions irrelevant (as in TS2Net.encode_text)
        inputs = {
            "ids": np.ascontiguousarray(tokens.ids[:, :length], dtype=np.int64),
            "eot": eot.astype(np.int64)[:, None],
            "mask": np.triu(np.full((length, length), -np.inf, dtype=np.float32), 1),
        }
        (features,) = self.session.run(None, inputs)
        return features, tokens.truncated


def path_for(library: Library) -> Path:
    return library.directory / FILE_NAME


def load_text_encoder(library: Library, threads: int | None = None) -> TextEncoder | None:
    """The library's exported text encoder, or None when there is none for the library's current model (or ONNX
    Runtime is not installed)."""
    tokenizer.prepare_in_background()  # Python work, overlapping the session's set-up (which lets go of the GIL)
    found = _current_session(library, threads or default_threads())
    if found is None:
        return None
    session, meta = found
    return TextEncoder(session, int(meta["words"]), json.loads(meta["identity"]))


def discard(library: Library) -> None:
    """Remove the library's copy (one that gives unusable vectors); the next torch search writes a new one."""
    with contextlib.suppress(OSError):  # a read-only library: searches then go through torch
        path_for(library).unlink()


def is_current(library: Library) -> bool:
    """Whether the library holds an exported text encoder for its current model."""
    return _current_session(library, threads=1, optimize=False) is not None


def _current_session(
    library: Library, threads: int, *, optimize: bool = True
) -> tuple[onnxruntime.InferenceSession, dict[str, str]] | None:
    """A session on the library's exported file and its metadata, if the file is there, readable and for the
    library's current model."""
    stored, path = library.model_config(), path_for(library)
    if stored is None or not path.is_file():
        return None
    session = _open_session(path, threads, optimize=optimize)
    if session is None:
        return None
    meta = session.get_modelmeta().custom_metadata_map
    return (session, meta) if _is_current(meta, stored) else None


def _open_session(path: Path, threads: int, *, optimize: bool = True) -> onnxruntime.InferenceSession | None:
    """A session on the exported file, or None if ONNX Runtime is missing or cannot read it (the torch path then
    answers, and rewrites the file)."""
    try:
        import onnxruntime
    except ImportError:
        return None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Waiting threads sleep instead of spinning: a search is over in milliseconds, and spinning threads only take
    # the core from the rest of the query (and from other programs).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: its warnings are about ONNX Runtime itself, not the query
    if not optimize:  # enough to read the metadata
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception:  # ONNX Runtime raises one class per status code (a bad file, an unknown opset...), all bare
        return None


def _is_current(meta: dict[str, str], stored: dict[str, Any]) -> bool:
    try:
        current = meta.get("format") == FORMAT and meta.get("words", "").isdigit()
        return current and same_record(json.loads(meta["identity"]), stored)
    except (KeyError, ValueError):
        return False


def exportable(loaded: Any) -> bool:
    """Whether ``loaded`` (a ``LoadedModel``) has a text tower this module reproduces."""
    from .model import text_tower

    cfg = loaded.config.backbone_cfg or {}
    return bool(loaded.config.quick_gelu) and text_tower.supports(cfg)


def writable(loaded: Any) -> bool:
    """Whether ``save_text_encoder`` would write ``loaded``'s text tower: one this module reproduces, with its fp32
    weights (a CPU model already cast to bf16 is not exported)."""
    return exportable(loaded) and not (loaded.dtype is not None and loaded.device.type == "cpu")


def save_text_encoder(library: Library, loaded: Any) -> bool:
    """Write the text tower of ``loaded`` (fp32 weights, before any bf16 cast) for torch-free searches; returns
    whether it was written. Replaces the file atomically, so a search never reads half of it."""
    if not writable(loaded):
        return False
    try:
        import onnx
        import onnxruntime  # noqa: F401  (without it the copy could not be read: not worth writing)
    except ImportError:
        return False
    state = {
        key: tensor.detach().float().cpu().numpy()
        for key, tensor in loaded.net.clip.state_dict().items()
        if key.startswith(_TEXT_PREFIXES)
    }
    text_cfg = (loaded.config.backbone_cfg or {}).get("text_cfg", {})
    meta = {
        "format": FORMAT,
        "identity": json.dumps(loaded.identity, sort_keys=True),
        "words": str(loaded.config.words),
    }
    graph = text_tower_graph(state, heads=text_cfg.get("heads", 8), layers=text_cfg.get("layers", 12), meta=meta)
    path = path_for(library)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        onnx.save_model(graph, str(temporary))
        # readable by whoever can read the library (written like the database, whatever the umask)
        os.chmod(temporary, (library.directory / DB_FILE).stat().st_mode & 0o666)
        os.replace(temporary, path)
        for old in OLD_FILE_NAMES:
            with contextlib.suppress(OSError):
                (library.directory / old).unlink()
        _remove_left_behind(path)
    except (OSError, ValueError):
        return False  # a read-only or full disk: searches still work, through torch
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink()
    return True


def _remove_left_behind(path: Path) -> None:
    """Half-written copies (up to 127 MB each) of processes killed while they wrote one; a living process's
    copy is its own to finish."""
    for partial in path.parent.glob(f".{path.name}.*.tmp"):
        pid = partial.name.removeprefix(f".{path.name}.").removesuffix(".tmp")
        if pid.isdigit() and not _running(int(pid)):
            with contextlib.suppress(OSError):
                partial.unlink()


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def text_tower_graph(state: dict[str, np.ndarray], heads: int, layers: int, meta: dict[str, str]) -> onnx.ModelProto:
    """CLIP's text tower as an ONNX model, from its open_clip state dict (float32 arrays).

    Inputs: ``ids`` (B, L) token ids up to the last EOT, ``eot`` (B, 1) each text's EOT position, ``mask`` (L, L)
    the additive causal mask. Output: ``features`` (B, D). Weights are stored as float16 and widened once when a
    session is made (its constant folding), so the file is half the size and the products run in float32.
    """
    from onnx import TensorProto, helper

    graph = _GraphBuilder()
    table = graph.constant("token_embedding.weight", state["token_embedding.weight"].astype(np.float16))
    x = graph.op("Cast", graph.op("Gather", table, "ids"), to=TensorProto.FLOAT)
    length = graph.op("Shape", "ids", start=1, end=2)
    positions = graph.op("Slice", graph.weight("positional_embedding", state), graph.ints("zero", [0]), length)
    x = graph.op("Add", x, positions)
    width = state["positional_embedding"].shape[1]
    head_width = width // heads
    for layer in range(layers):
        prefix = f"transformer.resblocks.{layer}."
        y = graph.layer_norm(x, prefix + "ln_1.", state)
        qkv = graph.linear(y, prefix + "attn.in_proj_", state)
        split = graph.op("Reshape", qkv, graph.ints("qkv_shape", [0, 0, 3, heads, head_width]))
        split = graph.op("Transpose", split, perm=[2, 0, 3, 1, 4])  # (3, B, heads, L, head width)
        q, k, v = (graph.op("Gather", split, graph.ints(f"part{i}", i), axis=0) for i in range(3))
        scores = graph.op("MatMul", q, graph.op("Transpose", k, perm=[0, 1, 3, 2]))
        scale = graph.floats("scale", head_width**-0.5)
        scores = graph.op("Add", graph.op("Mul", scores, scale), "mask")
        attended = graph.op("MatMul", graph.op("Softmax", scores, axis=-1), v)
        attended = graph.op("Transpose", attended, perm=[0, 2, 1, 3])
        attended = graph.op("Reshape", attended, graph.ints("width_shape", [0, 0, width]))
        if layer == layers - 1:
            # Only the EOT token's output is used: the last block needs every token's keys and values, but the
            # rest of its work (three quarters of its weights' products) only for that token.
            x, attended = (graph.op("GatherND", t, "eot", batch_dims=1) for t in (x, attended))
        x = graph.op("Add", x, graph.linear(attended, prefix + "attn.out_proj.", state))
        hidden = graph.linear(graph.layer_norm(x, prefix + "ln_2.", state), prefix + "mlp.c_fc.", state)
        gate = graph.op("Sigmoid", graph.op("Mul", hidden, graph.floats("quick_gelu", QUICK_GELU_SCALE)))
        x = graph.op("Add", x, graph.linear(graph.op("Mul", hidden, gate), prefix + "mlp.c_proj.", state))
    x = graph.layer_norm(x, "ln_final.", state)
    graph.op("MatMul", x, graph.weight("text_projection", state), output="features")
    inputs = [
        helper.make_tensor_value_info("ids", TensorProto.INT64, ["texts", "tokens"]),
        helper.make_tensor_value_info("eot", TensorProto.INT64, ["texts", 1]),
        helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["tokens", "tokens"]),
    ]
    dim = state["text_projection"].shape[1]
    outputs = [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["texts", dim])]
    model = helper.make_model(
        helper.make_graph(graph.nodes, "clip_text_tower", inputs, outputs, graph.initializers),
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="ts2",
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(model, meta)
    return model


class _GraphBuilder:
    """Nodes and initializers of an ONNX graph, each node's output named after a counter."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._names: set[str] = set()

    def op(self, op_type: str, *inputs: str, output: str | None = None, **attributes: Any) -> str:
        from onnx import helper

        output = output or f"{op_type.lower()}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], **attributes))
        return output

    def constant(self, name: str, value: np.ndarray) -> str:
        """An initializer (named once, however often it is asked for)."""
        from onnx import numpy_helper

        if name not in self._names:
            self._names.add(name)
            # np.array, not np.ascontiguousarray: that one turns a scalar into a 1-D array
            self.initializers.append(numpy_helper.from_array(np.array(value, order="C"), name))
        return name

    def ints(self, name: str, value: int | list[int]) -> str:
        return self.constant(name, np.array(value, dtype=np.int64))

    def floats(self, name: str, value: float) -> str:
        return self.constant(name, np.array(value, dtype=np.float32))

    def weight(self, key: str, state: dict[str, np.ndarray], *, transpose: bool = False) -> str:
        """A weight of the state dict, stored as float16 and widened to float32 in the graph."""
        from onnx import TensorProto

        value = state[key].T if transpose else state[key]
        return self.op("Cast", self.constant(key, value.astype(np.float16)), to=TensorProto.FLOAT)

    def linear(self, x: str, prefix: str, state: dict[str, np.ndarray]) -> str:
        """``x @ weight.T + bias``, the weight stored transposed (ONNX's MatMul takes (in, out))."""
        product = self.op("MatMul", x, self.weight(prefix + "weight", state, transpose=True))
        return self.op("Add", product, self.weight(prefix + "bias", state))

    def layer_norm(self, x: str, prefix: str, state: dict[str, np.ndarray]) -> str:
        scale, bias = self.weight(prefix + "weight", state), self.weight(prefix + "bias", state)
        return self.op("LayerNormalization", x, scale, bias, axis=-1, epsilon=LAYER_NORM_EPS)
