"""The models' weights ahead of time, in the standard Hugging Face cache: download and check them
(:func:`download`), what is cached (:func:`cached`), the hub files an offline server needs
(:func:`hub_urls`). ``ntt models`` (:mod:`ntt_core.cli.models`) is their command line.

Models are named by short names (``sam2-large``, ``dinov2-large``...); none means the paper's pair.
"""

from __future__ import annotations

import gc

from .checkpoints import ModelNotFoundError, cached_hub_file
from .models import (
    DEFAULT_DINOV2,
    DEFAULT_SAM2,
    DINOV2,
    DINOV2_MODELS,
    SAM2,
    SAM2_MODELS,
    ModelSource,
    load_weights,
    resolve_model,
)


def sources(names: list[str] | None = None) -> list[tuple[str, ModelSource]]:
    """(short name, source) of ``names`` (default: the paper's pair); an unknown name is an error."""
    chosen = []
    for name in names or [DEFAULT_SAM2, DEFAULT_DINOV2]:
        kind = SAM2 if name in SAM2_MODELS else DINOV2 if name in DINOV2_MODELS else None
        if kind is None:
            raise ModelNotFoundError(f"unknown model name {name!r}; known: {', '.join([*SAM2_MODELS, *DINOV2_MODELS])}")
        chosen.append((name, resolve_model(kind, name)))
    return chosen


def download(names: list[str] | None = None) -> list[dict]:
    """Download each model into the cache (unless there already) and load it strictly; one report each."""
    reports = []
    for name, source in sources(names):
        local = source.local_path()
        model = load_weights(source)  # a CheckpointError if anything does not fit
        parameters = sum(parameter.numel() for parameter in model.parameters())
        del model
        gc.collect()
        reports.append(
            {"name": name, "path": str(local), "bytes": cached(name, source)["bytes"], "parameters": parameters}
        )
    return reports


def cached(name: str, source: ModelSource) -> dict:
    """Whether every hub file of ``source`` is in the cache, its folder and total size."""
    paths = [cached_hub_file(source.repo_id, filename) for filename in source.hub_files()]
    present = [path for path in paths if path is not None]
    return {
        "name": name,
        "repo_id": source.repo_id,
        "files": source.hub_files(),
        "cached": len(present) == len(paths),
        "folder": str(present[0].parent) if present else None,
        "bytes": sum(path.stat().st_size for path in present),
    }


def hub_urls(source: ModelSource) -> list[str]:
    """The download URL of each hub file of ``source`` (on the configured endpoint)."""
    from huggingface_hub import hf_hub_url

    return [hf_hub_url(source.repo_id, filename) for filename in source.hub_files()]
