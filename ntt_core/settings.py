"""Settings of the method; the defaults are the paper's COCO few-shot configuration."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .input_rules import InputError

#: Prompts decoded at once when ``prompt_batch_size`` is None: the paper's 256 on an accelerator; 64 on
#: CPU, where it was measured faster (the CPU decoder works through a batch a few prompts at a time, so
#: its memory hardly grows with the batch; benchmarks/RESULTS.md).
DEFAULT_PROMPT_BATCH = {"cpu": 64, "accelerator": 256}
#: Settings that change memory and speed but never the results (proven in tests/test_predictor.py).
MEMORY_ONLY = ("prompt_batch_size",)


@dataclass(frozen=True)
class Settings:
    """Every knob of the pipeline. Defaults reproduce the paper (see docs/method.md).

    Input sizes are not here: SAM2's frame (1024) and mask size (256) come from its config,
    DINOv2's input side (518) from ``encoder_size`` or its config, the patch grid (37) from both.
    """

    points_per_side: int = 32
    prompt_batch_size: int | None = None  # None: DEFAULT_PROMPT_BATCH for the device
    sam_iou_threshold: float = 0.4
    nms_iou_threshold: float = 0.5
    pre_merge_keep: int = 800
    max_detections: int = 100
    soft_merge_exponent: float = 0.5
    context_ratio: float = 0.2
    negative_temperature: float = 0.8
    score_threshold: float = 0.0
    encoder_size: int | None = None
    add_no_memory_embedding: bool = False

    def __post_init__(self) -> None:
        checks = {  # name -> (valid, the rule)
            "points_per_side": (self.points_per_side >= 1, ">= 1"),
            "prompt_batch_size": (self.prompt_batch_size is None or self.prompt_batch_size >= 1, ">= 1 or None"),
            "sam_iou_threshold": (0.0 <= self.sam_iou_threshold <= 1.0, "in [0, 1]"),
            "nms_iou_threshold": (0.0 < self.nms_iou_threshold <= 1.0, "in (0, 1]"),
            "pre_merge_keep": (self.pre_merge_keep >= 1, ">= 1"),
            "max_detections": (self.max_detections >= 1, ">= 1"),
            "soft_merge_exponent": (0.0 <= self.soft_merge_exponent < float("inf"), ">= 0 and finite"),
            "context_ratio": (0.0 <= self.context_ratio < float("inf"), ">= 0 and finite"),
            "negative_temperature": (0.0 < self.negative_temperature < float("inf"), "> 0 and finite"),
            "score_threshold": (0.0 <= self.score_threshold <= 1.0, "in [0, 1]"),
            "encoder_size": (self.encoder_size is None or self.encoder_size >= 1, ">= 1 or None"),
        }
        bad = [f"{name}={getattr(self, name)!r} (must be {rule})" for name, (ok, rule) in checks.items() if not ok]
        if bad:
            raise InputError(f"Invalid settings: {', '.join(bad)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def prompt_batch(self, device_type: str) -> int:
        """Prompts decoded at once on a device of type ``device_type`` (``"cpu"``, ``"cuda"``, ...)."""
        if self.prompt_batch_size is not None:
            return self.prompt_batch_size
        return DEFAULT_PROMPT_BATCH["cpu" if device_type == "cpu" else "accelerator"]

    @classmethod
    def from_dict(cls, values: dict) -> Settings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"Unknown settings: {', '.join(unknown)}")
        return cls(**values)

    def replace(self, **changes) -> Settings:
        return dataclasses.replace(self, **changes)
