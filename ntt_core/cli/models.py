"""``ntt models``: the models' weights ahead of time, in the standard Hugging Face cache.

    ntt models download [NAMES]   download (progress bar) and check that each loads strictly
    ntt models list               every short name: cached or not, where, how large
    ntt models files [NAMES]      the exact files (hub URLs) an offline server needs in its cache

NAMES are short names (``sam2-large``, ``dinov2-large``...); none means the paper's pair. The work
is done by :mod:`ntt_core.model_downloads`.
"""

from __future__ import annotations

import argparse

from ..model_downloads import cached, download, hub_urls, sources
from ..models import DINOV2_MODELS, SAM2_MODELS


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


def run_download(args: argparse.Namespace) -> None:
    """Download the named models (default: the paper's) and say where each is and that it loads."""
    for report in download(args.names):
        print(
            f"{report['name']}: {_megabytes(report['bytes'])} in {report['path']}, loads strictly "
            f"({report['parameters'] / 1e6:.1f} M parameters)"
        )


def run_list(args: argparse.Namespace) -> None:
    """Every short name: cached or not, where, how large."""
    from huggingface_hub import constants

    print(f"Hugging Face cache: {constants.HF_HUB_CACHE}")
    for name, source in sources([*SAM2_MODELS, *DINOV2_MODELS]):
        row = cached(name, source)
        where = f"cached, {_megabytes(row['bytes'])}, {row['folder']}" if row["cached"] else "not cached"
        print(f"{name:<17} {row['repo_id']:<32} {', '.join(row['files']):<34} {where}")


def run_files(args: argparse.Namespace) -> None:
    """The hub files an offline server needs in its cache, and how to get them there."""
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
