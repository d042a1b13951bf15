"""Seconds per image of a segmentation, measured on this machine and kept (in FiftyOne's execution
store) per device, models and prompt grid; refined after each run. The Segment form estimates a
run's time from them, and says so when no figure exists yet."""

from __future__ import annotations

import platform

STORE = "ntt_timings"
LONG_RUN_S = 60.0  # above this, the form recommends a scheduled run


def _store():
    from fiftyone.operators.store import ExecutionStore

    return ExecutionStore.create(STORE)


def timing_key(device: str, sam2: str, dinov2: str, points_per_side: int) -> str:
    """The key of a figure: this machine, the requested device ("auto" too), the model fields as given
    ("" is the paper's model) and the grid."""
    return "|".join((platform.node(), device, sam2 or "paper", dinov2 or "paper", str(points_per_side)))


def seconds_per_image(key: str) -> float | None:
    """The kept figure of ``key``, or None before any run measured one."""
    kept = _store().get(key)
    return None if kept is None else float(kept["seconds_per_image"])


def record_timing(key: str, seconds: float, images: int) -> None:
    """Refine the figure of ``key`` with a run that took ``seconds`` for ``images`` images: the mean
    over the last (up to 50) images measured."""
    kept = _store().get(key) or {"seconds_per_image": 0.0, "images": 0}
    weight = min(int(kept["images"]), 50 - min(images, 50))
    total = kept["seconds_per_image"] * weight + seconds
    _store().set(key, {"seconds_per_image": total / (weight + images), "images": weight + images})


def estimate(key: str, images: int) -> tuple[float | None, str]:
    """The estimated seconds of a run over ``images`` images (None when unknown) and the form's line on it."""
    per_image = seconds_per_image(key)
    device = key.split("|")[1]
    if per_image is None:
        return None, (
            f"No time measured yet on '{device}' for these models and grid on this machine: this run measures "
            "its first image (the figure is kept for the next estimates)."
        )
    seconds = per_image * images
    return seconds, (
        f"About {_duration(seconds)} on '{device}' for {images} image(s) ({per_image:.1f} s per image measured "
        "on this machine with these models and grid), plus loading the models."
    )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
