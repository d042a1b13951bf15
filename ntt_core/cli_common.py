"""What the command-line programs share (``ntt``, its ``demo`` and ``shards`` commands, the
benchmarks): argparse types that apply the library's input rules, the CLI's error, and the
metrics table."""

from __future__ import annotations

import argparse

from .coco import METRIC_NAMES
from .errors import NttError
from .input_rules import InputError, check_count, check_seed


class CliError(NttError):
    """A command-line input the commands cannot use (e.g. an unavailable device)."""


def count_option(name: str):
    """An argparse type for a count of at least 1: the library's rule (:func:`ntt_core.input_rules.check_count`)
    with its message about ``name``, the parameter's name in the Python API and the App's forms."""

    def count(text: str) -> int:
        return _ruled(lambda value: check_count(value, name), text)

    return count


shots_option = count_option("shots")


def seed_option(text: str) -> int:
    """``--seed``: the library's rule (:func:`ntt_core.input_rules.check_seed`), as an argparse type."""
    return _ruled(check_seed, text)


def _ruled(rule, text: str) -> int:
    try:
        return rule(int(text))
    except ValueError as error:  # not an integer, or the rule's message
        message = str(error) if isinstance(error, InputError) else f"{text!r} is not an integer"
        raise argparse.ArgumentTypeError(message) from None


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"{text} is not a number >= 0")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def class_choice(text: str) -> str | list[str]:
    """``few-shot`` / ``all`` / comma-separated class names."""
    if text in ("few-shot", "all"):
        return text
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give few-shot, all, or comma-separated class names")
    return names


def print_metrics(report: dict) -> None:
    """A table of the bbox and segm metrics of ``report`` (those present and not None), in percent."""
    print("      " + "".join(f"{name:>7}" for name in METRIC_NAMES))
    for iou_type in ("bbox", "segm"):
        if report.get(iou_type):
            cells = "".join(f"{100 * v:7.1f}" if v >= 0 else f"{'-':>7}" for v in report[iou_type].values())
            print(f"{iou_type:<6}{cells}")
