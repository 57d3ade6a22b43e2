"""TS2-Net on open_clip. One module per part of the model spec (docs/model.md):

- ``config``: hyper-parameters and the official/fixed compat modes
- ``preprocess``: tokenisation (§2), pixel normalisation and padding (§1.2–1.3)
- ``visual`` and ``token_shift``: the ViT token encoder with token shift (§3)
- ``selection``: CLS + top-K patch selection (§4)
- ``temporal``: temporal transformer and frame pick (§5)
- ``similarity``: frame-weighted similarity and loss (§6–7)
- ``ts2net``: the assembled model; ``checkpoint``: formats (§12); ``loading``: options → ready model
"""

from .checkpoint import read_checkpoint, save_checkpoint
from .config import COMPAT_MODES, TOPK_RULES, Compat, TopK, TS2Config
from .loading import LoadedModel, ModelOptions, load_model, out_of_memory_says, resolve_device
from .similarity import frame_weighted_similarity, symmetric_infonce
from .ts2net import TS2Net

__all__ = [
    "COMPAT_MODES",
    "TOPK_RULES",
    "Compat",
    "LoadedModel",
    "ModelOptions",
    "TS2Config",
    "TS2Net",
    "TopK",
    "frame_weighted_similarity",
    "load_model",
    "out_of_memory_says",
    "read_checkpoint",
    "resolve_device",
    "save_checkpoint",
    "symmetric_infonce",
]
