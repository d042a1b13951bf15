"""Reference instances: what a user gives the method (an image and its annotated instances, each
a mask or a box and a class), the error for references that cannot be used, and the record of
one left out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import NttError


class InvalidReferenceError(NttError):
    """References that cannot make a memory bank; the message says which and why."""


@dataclass
class ReferenceInstance:
    """One annotated example: a mask (preferred) or a box, and its class."""

    class_name: str
    mask: np.ndarray | None = None  # [H, W] bool or float in [0, 1], at the image's size
    box: Sequence[float] | None = None  # (x0, y0, x1, y1) in pixels: the annotation's box, which the crop follows
    reference_id: str = ""
    negative: bool = False  # an example of what is *not* ``class_name``


@dataclass
class ReferenceImage:
    """An image and the reference instances annotated in it."""

    image: np.ndarray | str | Path
    instances: list[ReferenceInstance]
    image_id: str = ""
    exif_orientation: bool = True  # for a file: read it upright by its EXIF tag (see images.load_image)


def skipped_instance(instance: ReferenceInstance, reason: str) -> dict:
    """The record of a reference instance left out: ``{"reference_id", "class_name", "reason"}``."""
    return {"reference_id": instance.reference_id, "class_name": instance.class_name, "reason": reason}
