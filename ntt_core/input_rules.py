"""The rules for inputs that several paths take (CLI, Python API, operators), each with its one message.

Every path calls these, so a seed, a number of shots or a crowd annotation is judged the same way
and refused with the same words everywhere. Nothing here imports torch or fiftyone.
"""

from __future__ import annotations

from collections.abc import Mapping

from .errors import NttError

#: Why a crowd annotation never becomes a reference (the paper's protocol samples non-crowd ones only).
CROWD_REASON = "crowd annotation (iscrowd=1): a region of several instances is never used as a reference"


class InputError(NttError):
    """An input that breaks one of the rules below; the message names the input and the rule."""


def check_seed(seed, name: str = "seed") -> int:
    """``seed`` if it is an integer >= 0 (Python's and numpy's generators would treat a negative one
    differently, so it is refused everywhere)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"{name} must be an integer of at least 0, got {seed!r}")
    return seed


def check_count(value, name: str) -> int:
    """``value`` if it is an integer >= 1 (shots, references per class, images per batch...)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be at least 1, got {value!r}")
    return value


def is_crowd(annotation) -> bool:
    """Whether a COCO annotation (dict) or a FiftyOne label has ``iscrowd`` set."""
    if isinstance(annotation, Mapping):
        return bool(annotation.get("iscrowd", 0))
    return bool(annotation.get_field("iscrowd")) if annotation.has_field("iscrowd") else False
