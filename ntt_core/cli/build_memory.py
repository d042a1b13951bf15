"""``ntt build-memory``: describe the reference instances with DINOv2 and save a memory bank."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..coco import load_coco, references_from_coco
from ..input_rules import CROWD_REASON, is_crowd
from .options import (
    PAPER,
    CliError,
    add_model_options,
    load_device,
    load_encoder,
    load_segmenter,
    non_negative_float,
    settings_from,
    shots_option,
)
from .output import check_bank_folder, estimate, seconds

logger = logging.getLogger(__name__)


def add_parser(commands, formatter) -> None:
    build = commands.add_parser(
        "build-memory",
        help="describe the reference instances with DINOv2 and save a memory bank",
        description="Build a memory bank from a COCO json of references (masks, or boxes that SAM2 turns into masks).",
        formatter_class=formatter,
    )
    build.add_argument("--references", required=True, type=Path, help="COCO json of the references")
    build.add_argument(
        "--images", required=True, type=Path, help="folder the references' file_name entries are relative to"
    )
    build.add_argument("--out", required=True, type=Path, help="memory bank folder to write")
    build.add_argument("--overwrite", action="store_true", help="replace the memory bank already in --out")
    build.add_argument(
        "--shots", type=shots_option, help="use at most this many references per class (first ones in the file)"
    )
    build.add_argument(
        "--context-ratio",
        type=non_negative_float,
        default=PAPER.context_ratio,
        help="context added around each reference crop",
    )
    add_model_options(build)
    build.set_defaults(command=run)


def run(args: argparse.Namespace) -> None:
    import torch
    from tqdm import tqdm

    from ..memory_bank import build_memory_bank

    check_bank_folder(args.out, args.overwrite)
    coco = load_coco(args.references)
    references = references_from_coco(args.references, args.images, max_per_class=args.shots)
    instances = [instance for reference in references for instance in reference.instances]
    if not instances:
        raise CliError(f"{args.references}: no usable (non-crowd) reference annotation")
    names = {category["id"]: category["name"] for category in coco["categories"]}
    for annotation in filter(is_crowd, coco["annotations"]):
        logger.warning(f"reference {annotation['id']} ({names.get(annotation['category_id'])}) skipped: {CROWD_REASON}")
    used = {instance.class_name for instance in instances}
    classes = [category["name"] for category in coco["categories"] if category["name"] in used]
    if args.shots is not None:
        for name in classes:
            count = sum(instance.class_name == name for instance in instances)
            if count < args.shots:
                logger.warning(f"class {name!r} has {count} reference(s), fewer than --shots {args.shots}")

    settings = settings_from(args)
    device = load_device(args.device)
    encoder = load_encoder(args, device, settings.encoder_size)
    with_boxes = any(instance.mask is None for instance in instances)
    segmenter = load_segmenter(args, device, settings) if with_boxes else None
    if device.type == "cpu":
        size = encoder.input_size
        time = seconds(lambda: encoder.encode(torch.zeros(1, 3, size, size))) * len(instances)
        if segmenter is not None:
            frame = segmenter.input_size
            boxed = sum(any(instance.mask is None for instance in reference.instances) for reference in references)
            time += seconds(lambda: segmenter.embed(torch.zeros(1, 3, frame, frame))) * boxed
        estimate(time, f"{len(instances)} reference instances")

    with (
        tqdm(total=len(references), desc="reading references", unit="image") as reading,
        tqdm(total=len(instances), desc="describing", unit="instance") as describing,
    ):
        bank = build_memory_bank(
            references,
            _CountingEncoder(encoder, describing),
            segmenter,
            settings,
            classes=classes,
            progress=lambda done: reading.update(done - reading.n),
        )
    for skipped in bank.skipped:
        logger.warning(f"reference {skipped['reference_id']} ({skipped['class_name']}) skipped: {skipped['reason']}")
    bank.save(args.out)
    counts = ", ".join(f"{name}: {count}" for name, count in bank.counts().items())
    print(f"wrote a memory bank of {len(bank.reference_ids)} references ({counts}) to {args.out}")


class _CountingEncoder:
    """An encoder that advances a progress bar by the number of crops it encodes."""

    def __init__(self, encoder, bar) -> None:
        self._encoder, self._bar = encoder, bar

    def __getattr__(self, name: str):
        return getattr(self._encoder, name)

    def encode(self, images):
        features = self._encoder.encode(images)
        self._bar.update(images.shape[0])
        return features
