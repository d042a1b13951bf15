"""``ntt evaluate``: pycocotools bbox and segm AP of a results json."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..coco import load_coco, resolve_classes, write_json
from ..coco_evaluation import evaluate
from .options import class_choice
from .output import check_outputs, print_metrics


def add_parser(commands, formatter) -> None:
    assess = commands.add_parser(
        "evaluate",
        help="pycocotools bbox and segm AP of a results json",
        description="COCOeval (100 detections) of results against a ground-truth COCO json.",
        formatter_class=formatter,
    )
    assess.add_argument("--targets", required=True, type=Path, help="ground-truth COCO json")
    assess.add_argument("--results", required=True, type=Path, help="COCO results json")
    assess.add_argument(
        "--classes", type=class_choice, help="restrict to these classes: few-shot, all, or names a,b,c (default: all)"
    )
    assess.add_argument("--out", type=Path, help="also write the metrics as json here")
    assess.set_defaults(command=run)


def run(args: argparse.Namespace) -> None:
    if args.out is not None:
        check_outputs([("--out", args.out)], overwrite=True)
    truth = load_coco(args.targets)
    categories = None
    if args.classes is not None:
        categories = [category["id"] for category in resolve_classes(truth, args.classes, str(args.targets))]
    report = evaluate(truth, args.results, categories)
    names = {category["id"]: category["name"] for category in truth["categories"]}
    print(f"classes ({len(report['categories'])}): {', '.join(names[c] for c in report['categories'])}")
    print_metrics(report)
    for note in report["notes"]:
        print(f"note: {note}")
    if args.out is not None:
        write_json(report, args.out)
