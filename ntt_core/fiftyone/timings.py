"""Seconds per image of a segmentation (per reference image of a bank's build), measured on this
machine and kept (in FiftyOne's execution store) per device, compute dtype, models and prompt grid
(``BUILD`` for a build); refined after each run. The Segment and Build forms estimate a run's time
from them, and say so when no figure exists yet. Images served from the candidate cache (segmented
before with the same models and grid, whatever the bank) cost only the bank-dependent finishing:
they are kept as a figure of their own (:func:`cached_key`)."""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable

from ..input_rules import dtype_name

STORE = "ntt_timings"
LONG_RUN_S = 60.0  # above this, the form recommends a scheduled run
BUILD = "build"  # the work of a figure for building a bank, in place of a segmentation's grid
WINDOW = 50  # a figure is the mean over the last this many images measured


def _store():
    from fiftyone.operators.store import ExecutionStore

    return ExecutionStore.create(STORE)


def timing_key(device: str, sam2: str, dinov2: str, points_per_side: int | str, dtype: str | None = "auto") -> str:
    """The key of a figure: this machine, the requested device ("auto" too), the compute dtype where
    it is not float32 (a bfloat16 run is faster: its figure is its own), the model fields as given
    ("" is the paper's model) and the grid (``BUILD`` for a build)."""
    name = dtype_name(dtype)  # a name or a torch dtype, as the model loaders take it
    reduced = () if name == "float32" else (name,)
    return "|".join((platform.node(), device, *reduced, sam2 or "paper", dinov2 or "paper", str(points_per_side)))


def cached_key(key: str) -> str:
    """The key of the figure of images served from the candidate cache, for the run figure ``key``."""
    return key + "|cached"


def seconds_per_image(key: str) -> float | None:
    """The kept figure of ``key``, or None before any run measured one."""
    kept = _kept(key)
    return None if kept is None else kept[0]


def record_timing(key: str, seconds: float, images: int) -> None:
    """Refine the figure of ``key`` with a run that took ``seconds`` for ``images`` images: the mean
    over the last (up to ``WINDOW``) images measured."""
    per_image, counted = _kept(key) or (0.0, 0)
    weight = min(counted, WINDOW - min(images, WINDOW))
    total = per_image * weight + seconds
    _store().set(key, {"seconds_per_image": total / (weight + images), "images": weight + images})


def record_run(key: str, seconds: float, images: int, from_cache: int) -> None:
    """Refine the figures of ``key`` with ``images`` images that took ``seconds``, ``from_cache`` of
    them served from the candidate cache: those are charged at the kept cached figure (none yet: no
    charge), the rest of the time to the others; a part made of cached images only refines the cached figure."""
    if from_cache >= images:
        record_timing(cached_key(key), seconds, images)
        return
    charged = from_cache * (seconds_per_image(cached_key(key)) or 0.0)
    record_timing(key, max(seconds - charged, 0.0), images - from_cache)


def run_timer(key: str, cached: bool = False) -> Callable[..., None]:
    """``timer(done, total, from_cache=0)``, to call after each batch of a run, that keeps the run's
    seconds per image under ``key`` (after its first batch when a figure is missing, and at its end),
    the images served from the candidate cache apart (:func:`record_run`; ``cached``: the run can
    have such images, so a missing cached figure also counts as missing)."""
    started, counted, from_cache_counted = time.monotonic(), 0, 0
    first = seconds_per_image(key) is None or (cached and seconds_per_image(cached_key(key)) is None)

    def timer(done: int, total: int, from_cache: int = 0) -> None:
        nonlocal started, counted, from_cache_counted, first
        if done > counted and (first or done == total):
            now = time.monotonic()
            record_run(key, now - started, done - counted, from_cache - from_cache_counted)
            started, counted, from_cache_counted, first = now, done, from_cache, False

    return timer


def _kept(key: str) -> tuple[float, int] | None:
    """``(seconds per image, images measured)`` kept for ``key``; None when there is none, or what is
    kept is not such a figure (written by hand or by another version): the next run measures again."""
    kept = _store().get(key)
    try:
        per_image, images = float(kept["seconds_per_image"]), int(kept["images"])
    except (TypeError, KeyError, ValueError, OverflowError):
        return None
    return (per_image, images) if math.isfinite(per_image) and per_image >= 0 and images > 0 else None


def estimate(key: str, images: int) -> tuple[float | None, str]:
    """The estimated seconds of a run over ``images`` images (reference images for a ``BUILD`` key;
    None when unknown) and the form's line on it."""
    per_image = seconds_per_image(key)
    parts = key.split("|")
    dtype = f" in {parts[2]}" if len(parts) == 6 else ""  # a reduced dtype's figure (timing_key)
    where, work = f"'{parts[1]}'{dtype}", parts[-1]
    image, setup = ("reference image", "these models") if work == BUILD else ("image", "these models and grid")
    if per_image is None:
        return None, (
            f"No time measured yet on {where} for {setup} on this machine: this run measures "
            f"its first {image} (the figure is kept for the next estimates)."
        )
    seconds = per_image * images
    cached = seconds_per_image(cached_key(key))
    reuse = (
        ""
        if cached is None
        else f" Images segmented before with these models and grid (any bank) come from the candidate cache at "
        f"{cached:.1f} s each: about {_duration(cached * images)} if all of them do."
    )
    return seconds, (
        f"About {_duration(seconds)} on {where} for {images} {image}(s) ({per_image:.1f} s per {image} "
        f"measured on this machine with {setup}), plus loading the models.{reuse}"
    )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
