"""``ntt sample-references``: K reference instances per class from a COCO json."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..coco import load_coco, sample_references, write_json
from .options import class_choice, seed_option, shots_option
from .output import check_outputs


def add_parser(commands, formatter) -> None:
    sample = commands.add_parser(
        "sample-references",
        help="pick K reference instances per class from a COCO json (the paper's few-shot protocol)",
        description="Per class: shuffle the class's annotations with the seed and keep K valid instances "
        "(not crowd, box >= 32 px, >= 10 px from the borders) from K distinct images.",
        formatter_class=formatter,
    )
    sample.add_argument("--annotations", required=True, type=Path, help="COCO instances json to sample from")
    sample.add_argument("--shots", required=True, type=shots_option, help="instances per class (K)")
    sample.add_argument("--seed", required=True, type=seed_option, help="random seed (an integer >= 0)")
    sample.add_argument(
        "--classes",
        default="few-shot",
        type=class_choice,
        help="few-shot (the 20 COCO-FSOD novel classes), all, or names a,b,c",
    )
    sample.add_argument(
        "--seed-scope",
        default="run",
        choices=("class", "run"),
        help="run (default, the authors' script): seeded once, classes in order of first annotation; class: random.seed(seed) before each class's shuffle",
    )
    sample.add_argument("--out", required=True, type=Path, help="output COCO json of the references")
    sample.set_defaults(command=run)


def run(args: argparse.Namespace) -> None:
    check_outputs([("--out", args.out)], overwrite=True)
    coco = load_coco(args.annotations)
    sampled = sample_references(coco, args.shots, args.seed, args.classes, args.seed_scope)
    write_json(sampled, args.out)
    print(
        f"wrote {len(sampled['annotations'])} references of {len(sampled['categories'])} classes "
        f"from {len(sampled['images'])} images to {args.out}"
    )
