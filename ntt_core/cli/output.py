"""What the commands write: output files (checked before any work, replaced whole) and lines on
the terminal (the metrics table, CPU time estimates, the library's warnings)."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from ..coco import write_json
from ..coco_evaluation import METRIC_NAMES
from .options import CliError

# --- files ---


def check_outputs(outputs: list[tuple[str, Path]], overwrite: bool) -> None:
    """Raise unless each ``(what, path)`` can be written as a file: not a folder, in a folder that
    exists or can be made and is writable, and (unless ``overwrite``) not there yet."""
    for what, path in outputs:
        if path.is_dir():
            raise CliError(f"{what} {path} is a folder: give a file name")
        if path.exists() and not overwrite:
            raise CliError(f"{what} {path} exists: add --overwrite to replace it")
        _check_writable_folder(what, path)


def check_bank_folder(path: Path, overwrite: bool) -> None:
    """Raise unless a memory bank can be saved into folder ``path``: new, empty, or (with
    ``overwrite``) a memory bank already."""
    from ..memory_bank import MANIFEST_NAME

    if path.exists() and not path.is_dir():
        raise CliError(f"--out {path} is a file, not a memory bank folder: give a folder name")
    if path.is_dir() and any(path.iterdir()):
        if not (path / MANIFEST_NAME).is_file():
            raise CliError(f"--out {path} is a folder that is not a memory bank: give a new or empty folder")
        if not overwrite:
            raise CliError(f"--out {path} holds a memory bank: add --overwrite to replace it")
    _check_writable_folder("--out", path)


def _check_writable_folder(what: str, path: Path) -> None:
    """Raise unless the nearest existing folder above ``path`` is a writable folder."""
    above = path.absolute().parent
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise CliError(f"{what} {path}: {above} is a file, not a folder")
    if not os.access(above, os.W_OK):
        raise CliError(f"{what} {path}: the folder {above} is not writable")


def replace_json(data, path: Path) -> None:
    """Write ``data`` as json to ``path`` through a temporary file, so ``path`` is never half-written."""
    partial = path.with_name(path.name + ".partial")
    write_json(data, partial)
    os.replace(partial, path)


# --- the terminal ---


def print_metrics(report: dict) -> None:
    """A table of the bbox and segm metrics of ``report`` (those present and not None), in percent."""
    print("      " + "".join(f"{name:>7}" for name in METRIC_NAMES))
    for iou_type in ("bbox", "segm"):
        if report.get(iou_type):
            cells = "".join(f"{100 * v:7.1f}" if v >= 0 else f"{'-':>7}" for v in report[iou_type].values())
            print(f"{iou_type:<6}{cells}")


def seconds(work) -> float:
    """How long ``work()`` takes."""
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def estimate(seconds: float, what: str) -> None:
    """``ntt: on CPU, about <time> for <what>``, above any progress bar."""
    from tqdm import tqdm

    amount = f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"
    tqdm.write(f"ntt: on CPU, about {amount} for {what}", file=sys.stderr)


class _StderrHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        print(f"ntt: {record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)


def log_warnings_to_stderr() -> None:
    """Show the library's warnings (short classes, skipped references) as ``ntt: warning: ...``."""
    package = logging.getLogger("ntt_core")
    if not any(isinstance(handler, _StderrHandler) for handler in package.handlers):
        package.addHandler(_StderrHandler(logging.WARNING))
