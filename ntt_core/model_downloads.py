"""``ntt models``: the models' weights ahead of time, in the standard Hugging Face cache.

    ntt models download [NAMES]   download (progress bar) and check that each loads strictly
    ntt models list               every short name: cached or not, where, how large
    ntt models files [NAMES]      the exact files (hub URLs) an offline server needs in its cache

NAMES are short names (``sam2-large``, ``dinov2-large``...); none means the paper's pair.
"""

from __future__ import annotations

import argparse
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


def add_parser(commands, formatter) -> None:
    """Register ``ntt models`` and its subcommands."""
    models = commands.add_parser(
        "models",
        help="download the models ahead of time, list the cached ones, list the files an offline server needs",
        description=f"Short names: {', '.join([*SAM2_MODELS, *DINOV2_MODELS])}. Files go to the Hugging Face "
        "cache (HF_HOME / HF_HUB_CACHE), where every later run finds them.",
        formatter_class=formatter,
    )
    actions = models.add_subparsers(title="actions", required=True, metavar="ACTION")
    names = dict(nargs="*", metavar="NAME", help="short names (default: the paper's sam2-large and dinov2-large)")
    download = actions.add_parser("download", help="download into the cache and check that each loads strictly")
    download.add_argument("names", **names)
    download.set_defaults(command=run_download)
    listing = actions.add_parser("list", help="which short names are cached, where, and their sizes")
    listing.set_defaults(command=run_list)
    files = actions.add_parser("files", help="the hub files (URLs) to put in an offline server's cache")
    files.add_argument("names", **names)
    files.set_defaults(command=run_files)


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


# --- commands ---


def run_download(args: argparse.Namespace) -> None:
    for report in download(args.names):
        print(
            f"{report['name']}: {_megabytes(report['bytes'])} in {report['path']}, loads strictly "
            f"({report['parameters'] / 1e6:.1f} M parameters)"
        )


def run_list(args: argparse.Namespace) -> None:
    from huggingface_hub import constants

    print(f"Hugging Face cache: {constants.HF_HUB_CACHE}")
    for name, source in sources([*SAM2_MODELS, *DINOV2_MODELS]):
        row = cached(name, source)
        where = f"cached, {_megabytes(row['bytes'])}, {row['folder']}" if row["cached"] else "not cached"
        print(f"{name:<17} {row['repo_id']:<32} {', '.join(row['files']):<34} {where}")


def run_files(args: argparse.Namespace) -> None:
    from huggingface_hub import constants

    chosen = sources(args.names)
    print(
        "An offline server finds these files in its Hugging Face cache: run `ntt models download` where the hub "
        f"can be reached and copy {constants.HF_HUB_CACHE} (or just the models--* folders below) to the server's "
        "cache, or download the files and give their paths with --sam2 / --dinov2 (a Meta .pt file; a folder "
        "holding config.json and model.safetensors)."
    )
    for name, source in chosen:
        folder = "models--" + source.repo_id.replace("/", "--")
        print(f"{name} ({folder}):")
        for url in hub_urls(source):
            print(f"  {url}")


def _megabytes(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"
