"""Training-free reference-based instance segmentation ("No Time to Train!", arXiv 2507.02798).

The public API is imported lazily so that ``import ntt_core`` stays cheap (no torch) for the
FiftyOne plugin's listing::

    from ntt_core import Predictor, build_memory_bank, load_encoder, load_segmenter
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Settings": "settings",
    "NttError": "errors",
    "ImageError": "images",
    "load_image": "images",
    "Instances": "instances",
    "load_segmenter": "models",
    "load_encoder": "models",
    "ModelNotFoundError": "models",
    "MemoryBank": "memory_bank",
    "MemoryBankError": "memory_bank",
    "InvalidReferenceError": "references",
    "ReferenceImage": "references",
    "ReferenceInstance": "references",
    "build_memory_bank": "memory_bank",
    "Predictor": "predictor",
    "CandidateCache": "candidate_cache",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'ntt_core' has no attribute {name!r}")
