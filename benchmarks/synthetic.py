"""The whole pipeline on synthetic scenes with the stand-in models: accuracy against exact ground
truth, and throughput of the predictor's own work.

Reference and target scenes come from ``ntt_core.synthetic`` (coloured shapes on textured grey
backgrounds, one unreferenced class among the targets as a distractor); SAM2 and DINOv2 are
replaced by ``ntt_core.standins`` (connected colour regions, colour-histogram patch features), so
the numbers say whether the pipeline's geometry, pooling, scoring and NMS are right at a larger
size, not how good the method is. Everything else is the real code: memory bank, predictor, COCO
export, pycocotools evaluation. The default run takes a few minutes on 2 CPU cores.

    python benchmarks/synthetic.py --json
    python benchmarks/synthetic.py --targets 100 --size 480 640 --frame 768 --mask-size 192 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ntt_core.coco import instances_to_coco_results
from ntt_core.coco_evaluation import evaluate
from ntt_core.errors import NttError
from ntt_core.memory_bank import build_memory_bank
from ntt_core.predictor import Predictor
from ntt_core.settings import Settings
from ntt_core.standins import ColourStatsEncoder, ConnectedRegionSegmenter
from ntt_core.synthetic import CLASSES, coco_ground_truth, make_dataset, reference_images


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--references", type=int, default=4, help="reference scenes (every instance is a reference)")
    parser.add_argument("--targets", type=int, default=40, help="target scenes to segment and evaluate")
    parser.add_argument("--size", type=int, nargs=2, default=(384, 512), metavar=("H", "W"), help="scene size")
    parser.add_argument("--classes", nargs="+", default=list(CLASSES[:3]), help=f"referenced classes, from {CLASSES}")
    parser.add_argument(
        "--distractor", default=CLASSES[3], help="an unreferenced class drawn among the targets ('' for none)"
    )
    parser.add_argument(
        "--instances", type=int, nargs=2, default=(3, 8), metavar=("MIN", "MAX"), help="shapes per scene"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frame", type=int, default=512, help="stand-in segmenter frame side (SAM2: 1024)")
    parser.add_argument("--mask-size", type=int, default=128, help="side of its mask logits (SAM2: 256)")
    parser.add_argument("--encoder-size", type=int, default=224, help="stand-in encoder input side (DINOv2: 518)")
    parser.add_argument("--grid", type=int, default=28, help="stand-in encoder patch grid (DINOv2: 37)")
    parser.add_argument("--points-per-side", type=int, default=Settings.points_per_side)
    parser.add_argument("--batch", type=int, default=2, help="images per predict() call")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings(points_per_side=args.points_per_side)
    segmenter = ConnectedRegionSegmenter(input_size=args.frame, mask_size=args.mask_size)
    encoder = ColourStatsEncoder(input_size=args.encoder_size, grid_size=args.grid)
    shapes = tuple(args.classes) + ((args.distractor,) if args.distractor else ())
    options = {"size": tuple(args.size), "instances": tuple(args.instances)}

    start = time.perf_counter()
    references = make_dataset(args.references, seed=args.seed, classes=tuple(args.classes), **options)
    targets = make_dataset(args.targets, seed=args.seed + 1, classes=shapes, **options)
    generated = time.perf_counter()
    bank = build_memory_bank(reference_images(references), encoder, settings=settings, classes=args.classes)
    predictor = Predictor(segmenter, encoder, bank, settings)
    built = time.perf_counter()
    predictions = []
    for first in range(0, len(targets), args.batch):
        predictions += predictor.predict([scene.image for scene in targets[first : first + args.batch]])
    predicted = time.perf_counter()

    truth, results = coco_ground_truth(targets, args.classes), []
    category_ids = {name: i + 1 for i, name in enumerate(args.classes)}
    for image_id, instances in enumerate(predictions, start=1):
        results += instances_to_coco_results(instances, image_id, category_ids)
    report = evaluate(truth, results)
    return {
        "segm_AP": report["segm"]["AP"],
        "segm_AP50": report["segm"]["AP50"],
        "segm_AP75": report["segm"]["AP75"],
        "bbox_AP": report["bbox"]["AP"],
        "bbox_AP50": report["bbox"]["AP50"],
        "bbox_AP75": report["bbox"]["AP75"],
        "images_per_s": len(targets) / (predicted - built),
        "targets": len(targets),
        "target_instances": sum(len(scene) for scene in targets),
        "references": len(bank.reference_ids),
        "detections": len(results),
        "seconds": {
            "generate": generated - start,
            "memory_bank": built - generated,
            "predict": predicted - built,
            "evaluate": time.perf_counter() - predicted,
        },
        "settings": settings.to_dict(),
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "torch_threads": torch.get_num_threads(),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        summary = run(args)
    except NttError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"{summary['targets']} targets ({summary['target_instances']} instances), {summary['references']} references: "
        f"segm AP {summary['segm_AP']:.3f}, bbox AP {summary['bbox_AP']:.3f}, "
        f"{summary['images_per_s']:.2f} images/s ({summary['seconds']['predict']:.1f} s predicting)"
    )
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
