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


#: The compute dtype names every path takes, by the dtype each means ("auto" is float32, the paper's).
DTYPE_NAMES = {"auto": "float32", "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def dtype_name(dtype) -> str:
    """The name of the compute dtype ``dtype`` means: one of :data:`DTYPE_NAMES` (None is "auto") or a
    torch dtype, by its torch name ("float32", "bfloat16"...); ValueError for any other name."""
    if dtype is None or isinstance(dtype, str):
        if (dtype or "auto") not in DTYPE_NAMES:
            raise ValueError(f"Unknown dtype {dtype!r}; use one of {', '.join(DTYPE_NAMES)}")
        return DTYPE_NAMES[dtype or "auto"]
    return str(dtype).removeprefix("torch.")


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
