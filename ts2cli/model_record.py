"""The model record: how a library, a cache or a checkpoint names the model its vectors came from.

A record is a JSON object (``ts2cli.model.loading`` writes it as ``LoadedModel.identity``). Two records name the
same model when they agree on everything except where the weights were loaded from: weights files move and get
renamed, so a file is compared by its content fingerprint, not its name.
"""

from __future__ import annotations

import json
from typing import Any

from .scan import fingerprint as sampled_fingerprint


def canonical_json(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


MODEL_SOURCE_KEY = "source"
"""Entry of a model config that says where the weights were loaded from. Files move, so it is not compared."""


WEIGHT_KEYS = ("clip_weights", "checkpoint")
"""Identity fields naming weights: a local file is ``name#sha256:digest`` (see ``WEIGHTS_DIGEST``), a tag is the
tag."""
WEIGHTS_DIGEST = "sha256:"
"""How a weights file's fingerprint in a model record starts when it is a digest of the whole file."""


def file_fingerprint(value: Any) -> str | None:
    """The content part of a weights field that names a local file (``name#fingerprint``); None for a tag."""
    return value.rpartition("#")[2] if isinstance(value, str) and "#" in value else None


def _comparable(config: dict[str, Any]) -> str:
    # Weights files move and get renamed: their content decides, not their name.
    comparable = {k: v for k, v in config.items() if k != MODEL_SOURCE_KEY}
    if (topk := record_topk(config)) is not None:
        comparable["topk"] = topk
    for key in WEIGHT_KEYS:
        if (fingerprint := file_fingerprint(comparable.get(key))) is not None:
            comparable[key] = "#" + fingerprint
    return canonical_json(comparable)


def implied_topk(compat: str | None) -> str:
    """The inference top-k of a TS2-Net recorded before it was a choice: its compat mode decided it (fixed: hard)."""
    return "hard" if compat == "fixed" else "perturbed"


def record_topk(config: dict[str, Any]) -> str | None:
    """A TS2-Net record's inference top-k; None for a zero-shot model, which selects no tokens."""
    if config.get("mode") != "ts2net":
        return None
    return config.get("topk") or implied_topk(config.get("compat"))


def same_model(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two model configs describe the same model, wherever its weights were loaded from."""
    return same_record(a, b) or _same_by_sampled_fingerprints(a, b) or _same_by_sampled_fingerprints(b, a)


def same_record(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two model configs say the same thing (``source`` aside), fingerprints included: what a file
    written for one record (the text encoder copy) must match, so that ``ts2 index`` rewrites it when the record
    changes."""
    return _comparable(a) == _comparable(b)


def _same_by_sampled_fingerprints(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether ``old``, a record written before weights files were digested whole (they were named by
    ``scan.fingerprint``, three sampled chunks), names the model ``new`` was loaded from: the files in ``new``'s
    source have the sampled fingerprints that ``old`` records. Such a library keeps working, and ``check_model``
    then records the whole-file digests."""
    files = new.get(MODEL_SOURCE_KEY) or {}
    relabelled, sampled = dict(new), False
    for key, file_key in zip(WEIGHT_KEYS, ("weights_file", "checkpoint"), strict=True):
        recorded = file_fingerprint(old.get(key))
        if recorded is None or recorded.startswith(WEIGHTS_DIGEST):
            continue
        try:
            relabelled[key] = "#" + sampled_fingerprint(files[file_key])[:16]
        except (KeyError, TypeError, OSError):
            return False
        sampled = True
    return sampled and _comparable(old) == _comparable(relabelled)


def model_summary(config: dict[str, Any]) -> str:
    """A model record in a few words, for messages about which model a library holds."""
    if "backbone" in config:
        weights = config.get("checkpoint") or config.get("clip_weights")
        mode, frames, compat = config.get("mode"), config.get("frames"), config.get("compat")
        topk = f", {rule} top-k" if (rule := record_topk(config)) else ""
        return f"{config['backbone']} ({weights}, {mode}, {frames} frames, compat {compat}{topk})"
    text = _comparable(config)
    return text if len(text) <= 120 else text[:119] + "…"
