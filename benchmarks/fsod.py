"""The paper's COCO few-shot protocol (COCO-FSOD), or the same steps on any COCO-format folder.

For each number of shots and each seed: sample K references per class from ``instances_train2017``
(``ntt_core.coco.sample_references``: not crowd, boxes >= 32 px, >= 10 px from the borders, K
distinct images), build the memory bank, segment val2017 (or its first ``--limit`` images), write
COCO results and report bbox / segm nAP, nAP50 and nAP75 from pycocotools over the evaluated classes
(the 20 novel classes for COCO), and with ``--fiftyone`` the same from FiftyOne's
``evaluate_detections`` (method "coco", masks for segm).

    python benchmarks/fsod.py --coco-root /data/coco --shots 30 --seeds 33 --json
    python benchmarks/fsod.py --coco-root /data/coco --shots 1 10 30 --all-seeds --limit 500
    python benchmarks/fsod.py --references refs.json --targets targets.json --images DIR --json

COCO layout expected under ``--coco-root``: ``annotations/instances_{train,val}2017.json``,
``train2017/`` and ``val2017/``. Paper (README, 30 shots, seed 33): 36.8 bbox / 34.2 segm nAP.

As the authors' code: references sampled with one seed for the run (their ``few_shot_sampling.py``),
images read as stored (no EXIF orientation) and masks upsampled to the json's height and width.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ntt_core.cli.options import seed_option, shots_option
from ntt_core.coco import (
    instances_to_coco_results,
    load_coco,
    references_from_coco,
    resolve_classes,
    sample_references,
    write_json,
)
from ntt_core.coco_evaluation import evaluate
from ntt_core.errors import NttError
from ntt_core.images import ImageError
from ntt_core.models import DEFAULT_DINOV2, DEFAULT_SAM2
from ntt_core.settings import Settings

#: The seeds of the paper's spread (mean +- std over these); 33 is the README's.
PAPER_SEEDS = (42, 13, 27, 36, 88, 33, 69, 55, 77, 99)
COCO_SHOTS = 30
METRICS = {"nAP": "AP", "nAP50": "AP50", "nAP75": "AP75"}


class FsodError(NttError):
    """A benchmark that cannot run as asked (missing files, unknown classes); the message says why."""


# --- data ---


def coco_sources(root: Path) -> dict:
    """The train2017 references and val2017 targets of a COCO folder."""
    paths = {
        "references": root / "annotations" / "instances_train2017.json",
        "targets": root / "annotations" / "instances_val2017.json",
        "reference_images": root / "train2017",
        "images": root / "val2017",
    }
    missing = [str(path) for path in paths.values() if not path.exists()]
    if missing:
        raise FsodError(f"--coco-root {root}: missing {', '.join(missing)}")
    return paths


def limit_targets(targets: dict, limit: int | None) -> dict:
    """The targets restricted to their first ``limit`` images (file order), annotations included."""
    images = targets["images"][:limit] if limit else targets["images"]
    kept = {image["id"] for image in images}
    return {**targets, "images": images, "annotations": [a for a in targets["annotations"] if a["image_id"] in kept]}


# --- one run ---


def predict(predictor, targets: dict, image_dir: Path, category_ids: dict, batch_size: int) -> tuple[list, list]:
    """COCO results of every target image, and the images that could not be used (with the reason).

    As the authors' loader: the stored pixels (no EXIF orientation), masks at the json's size."""
    from tqdm import tqdm

    results, failed = [], []
    images = targets["images"]
    paths = [image_dir / image["file_name"] for image in images]
    sizes = [(image["height"], image["width"]) for image in images]
    stream = predictor.predict_stream(paths, batch_size, sizes=sizes, exif_orientation=False)
    for index, output in tqdm(stream, total=len(images), desc="segmenting", unit="image", file=sys.stderr):
        if isinstance(output, ImageError):
            failed.append(str(output))
        else:
            results.extend(instances_to_coco_results(output, images[index]["id"], category_ids))
    return results, failed


def pycocotools_figures(truth: dict, results: list, category_ids: Sequence[int]) -> dict:
    """bbox / segm nAP, nAP50, nAP75 over ``category_ids``, from :func:`ntt_core.coco_evaluation.evaluate`."""
    report = evaluate(truth, results, category_ids)
    figures = {t: {name: report[t][key] for name, key in METRICS.items()} for t in ("bbox", "segm") if t in report}
    return {**figures, "notes": report["notes"]}


def fiftyone_figures(truth: dict, results: list, image_dir: Path, class_names: Sequence[str]) -> dict:
    """The same figures from FiftyOne's COCO-style ``evaluate_detections`` on a temporary dataset
    (boxes for bbox, masks for segm); AP50 / AP75 from its precision table at those IoUs.

    The predictions get the boxes the plugin writes, their masks' pixel extent (one pixel wider and
    taller than the authors' inclusive results boxes): FiftyOne crops a mask to its box, so the
    inclusive box would cut off the mask's last row and column."""
    import fiftyone as fo
    import numpy as np
    from fiftyone.utils.coco import COCOObject

    names = {category["id"]: category["name"] for category in truth["categories"]}
    chosen = set(class_names)
    by_image: dict = {image["id"]: ([], []) for image in truth["images"]}
    for annotation in truth["annotations"]:
        if names[annotation["category_id"]] in chosen:
            by_image[annotation["image_id"]][0].append(annotation)
    for result in results:
        x, y, w, h = result["bbox"]
        by_image[result["image_id"]][1].append({**result, "bbox": [x, y, w + 1, h + 1]})
    masks = all(annotation.get("segmentation") for annotations, _ in by_image.values() for annotation in annotations)

    def detections(entries: list, frame: tuple[int, int]):
        objects = (COCOObject.from_anno_dict(dict(entry), extra_attrs=False) for entry in entries)
        return fo.Detections(detections=[o.to_detection(frame, names, load_segmentation=masks) for o in objects])

    dataset = fo.Dataset()
    try:
        samples = []
        for image in truth["images"]:
            frame = (image["width"], image["height"])
            annotations, predictions = by_image[image["id"]]
            samples.append(
                fo.Sample(
                    filepath=str(image_dir / image["file_name"]),
                    ground_truth=detections(annotations, frame),
                    predictions=detections(predictions, frame),
                )
            )
        dataset.add_samples(samples)
        figures, notes = {}, []
        for iou_type, use_masks in (("bbox", False), ("segm", True)):
            if use_masks and not masks:
                notes.append("segm skipped: some ground-truth annotations have no segmentation")
                continue
            evaluation = dataset.evaluate_detections(
                "predictions",
                gt_field="ground_truth",
                eval_key=iou_type,
                method="coco",
                use_masks=use_masks,
                compute_mAP=True,
                classes=list(class_names),
            )
            figures[iou_type] = {"nAP": float(evaluation.mAP())}
            for name, iou in (("nAP50", 0.5), ("nAP75", 0.75)):
                index = int(np.argmin(np.abs(evaluation.iou_threshs - iou)))
                per_class = evaluation.precision[index].mean(axis=1)  # [K] AP of each class at this IoU
                valid = per_class[per_class > -1]
                figures[iou_type][name] = float(valid.mean()) if valid.size else -1.0
        return {**figures, "notes": notes}
    finally:
        dataset.delete()


def run_once(args, models, sources: dict, references: dict, targets: dict, shots: int | None, seed: int | None) -> dict:
    """Sample (unless ``shots`` is None), build the bank, predict, write and evaluate one run."""
    from ntt_core.memory_bank import build_memory_bank
    from ntt_core.predictor import Predictor

    segmenter, encoder, settings = models
    name = "all-references" if shots is None else f"{shots}shot_seed{seed}"
    folder = Path(args.out) / name
    notes = []
    if shots is not None:
        references = sample_references(references, shots, seed, args.classes, args.seed_scope)
        notes += references["info"]["ntt_sampling"]["warnings"]  # classes with fewer than K valid instances
    present = {annotation["category_id"] for annotation in references["annotations"]}
    chosen = resolve_classes(references, args.classes, "references")
    class_names = [category["name"] for category in chosen if category["id"] in present]
    if not class_names:
        raise FsodError(f"{name}: no reference annotation of the chosen classes")
    notes += [f"class {c['name']!r} left out: no reference annotation" for c in chosen if c["id"] not in present]
    by_name = {category["name"]: category["id"] for category in targets["categories"]}
    missing = [c for c in class_names if c not in by_name]
    if missing:
        raise FsodError(f"the targets have no category for the reference class(es) {', '.join(map(repr, missing))}")
    write_json(references, folder / "references.json")

    start = time.perf_counter()
    reference_images = references_from_coco(
        references, sources["reference_images"], classes=class_names, exif_orientation=False
    )
    bank = build_memory_bank(reference_images, encoder, segmenter, settings, classes=class_names)
    bank.save(folder / "memory_bank")
    bank_seconds = time.perf_counter() - start

    category_ids = {c: by_name[c] for c in class_names}
    start = time.perf_counter()
    results, failed = predict(
        Predictor(segmenter, encoder, bank, settings), targets, sources["images"], category_ids, args.batch_size
    )
    seconds = time.perf_counter() - start
    write_json(results, folder / "results.json")

    evaluated = [category_ids[c] for c in class_names]
    report = {
        "shots": shots,
        "seed": seed,
        "classes": class_names,
        "notes": notes,
        "references": len(bank.reference_ids),
        "skipped_references": len(bank.skipped),
        "images": len(targets["images"]),
        "failed_images": failed,
        "detections": len(results),
        "bank_seconds": bank_seconds,
        "predict_seconds": seconds,
        "images_per_s": len(targets["images"]) / seconds if seconds > 0 else None,
        "pycocotools": pycocotools_figures(targets, results, evaluated),
        "fiftyone": fiftyone_figures(targets, results, sources["images"], class_names) if args.fiftyone else None,
        "output": str(folder),
    }
    write_json(report, folder / "metrics.json")
    return report


def summarise(runs: list[dict]) -> dict:
    """Mean and (population) standard deviation over seeds of every figure, per number of shots."""
    summary: dict = {}
    for shots in dict.fromkeys(run["shots"] for run in runs):
        group = [run for run in runs if run["shots"] == shots]
        entry = {"seeds": [run["seed"] for run in group]}
        for source in ("pycocotools", "fiftyone"):
            for iou_type in ("bbox", "segm"):
                for metric in METRICS:
                    values = [run[source][iou_type][metric] for run in group if run[source] and iou_type in run[source]]
                    if values:
                        entry[f"{source}_{iou_type}_{metric}"] = {
                            "mean": statistics.fmean(values),
                            "std": statistics.pstdev(values),
                        }
        summary["all" if shots is None else str(shots)] = entry
    return summary


# --- command line ---


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    data = parser.add_argument_group("data (either --coco-root, or --references, --targets and --images)")
    data.add_argument("--coco-root", type=Path, help="COCO 2017 folder: annotations/, train2017/, val2017/")
    data.add_argument("--references", type=Path, help="COCO json of the reference annotations")
    data.add_argument("--targets", type=Path, help="COCO json of the target images (with ground truth)")
    data.add_argument("--images", type=Path, help="folder of the target images")
    data.add_argument("--reference-images", type=Path, help="folder of the reference images (default: --images)")
    protocol = parser.add_argument_group("protocol")
    protocol.add_argument(
        "--shots",
        type=shots_option,
        nargs="+",
        help=f"references per class, sampled (default: {COCO_SHOTS} for COCO; every reference as given otherwise)",
    )
    protocol.add_argument("--seeds", type=seed_option, nargs="+", default=[33], help="sampling seeds (integers >= 0)")
    protocol.add_argument("--all-seeds", action="store_true", help=f"the paper's ten seeds {list(PAPER_SEEDS)}")
    protocol.add_argument(
        "--seed-scope",
        choices=["class", "run"],
        default="run",
        help="run: the authors' sampling (their reference sets); see ntt_core.coco.sample_references",
    )
    protocol.add_argument(
        "--classes",
        help="'few-shot' (the 20 novel classes), 'all', or comma-separated names (default: few-shot for COCO, all otherwise)",
    )
    protocol.add_argument("--limit", type=_positive, help="segment only the first N target images")
    protocol.add_argument(
        "--fiftyone", action="store_true", help="also evaluate with FiftyOne (needs fiftyone and its database)"
    )
    model = parser.add_argument_group("models")
    model.add_argument("--sam2", default=DEFAULT_SAM2, help="short name, hub id, local directory or Meta .pt file")
    model.add_argument("--dinov2", default=DEFAULT_DINOV2, help="short name, hub id, local directory or Meta .pth file")
    model.add_argument("--device", default="auto")
    model.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    model.add_argument("--batch-size", type=_positive, default=4, help="target images per predictor call")
    model.add_argument("--points-per-side", type=_positive, default=Settings().points_per_side)
    model.add_argument("--prompt-batch-size", type=_positive, help="prompts decoded at once (default: 256; 64 on CPU)")
    parser.add_argument(
        "--out", type=Path, default=Path("fsod-output"), help="folder for references, banks, results and metrics"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


def data_sources(args: argparse.Namespace) -> dict:
    """Paths of references, targets and their images, from either way of giving them."""
    custom = [args.references, args.targets, args.images]
    if args.coco_root is not None:
        if any(value is not None for value in custom + [args.reference_images]):
            raise FsodError("give --coco-root, or --references, --targets and --images, not both")
        return coco_sources(args.coco_root)
    if any(value is None for value in custom):
        raise FsodError("give --coco-root, or all of --references, --targets and --images")
    for path in (args.images, args.reference_images):
        if path is not None and not path.is_dir():
            raise FsodError(f"{path}: image folder not found")
    return {
        "references": args.references,
        "targets": args.targets,
        "images": args.images,
        "reference_images": args.reference_images or args.images,
    }


def run(args: argparse.Namespace) -> dict:
    from ntt_core.models import choose_device, load_encoder, load_segmenter

    coco_mode = args.coco_root is not None
    sources = data_sources(args)
    args.classes = args.classes or ("few-shot" if coco_mode else "all")
    if args.classes not in ("few-shot", "all"):
        args.classes = [name.strip() for name in args.classes.split(",") if name.strip()]
    shots_list = args.shots or ([COCO_SHOTS] if coco_mode else [None])
    seeds = list(PAPER_SEEDS) if args.all_seeds else args.seeds
    references = load_coco(sources["references"])
    targets = limit_targets(load_coco(sources["targets"]), args.limit)
    if not targets["images"]:
        raise FsodError(f"{sources['targets']}: no target images")

    try:
        device = choose_device(args.device)
    except RuntimeError as error:
        raise FsodError(f"--device {args.device}: {error}") from None
    settings = Settings(points_per_side=args.points_per_side, prompt_batch_size=args.prompt_batch_size)
    segmenter = load_segmenter(args.sam2, device, args.dtype, settings.add_no_memory_embedding)
    encoder = load_encoder(args.dinov2, device, args.dtype, settings.encoder_size)
    models = (segmenter, encoder, settings)

    runs = [
        run_once(args, models, sources, references, targets, shots, seed)
        for shots in shots_list
        for seed in (seeds if shots is not None else [None])
    ]
    return {
        "protocol": "coco-fsod" if coco_mode else "custom",
        "sam2": segmenter.model_id,
        "dinov2": encoder.model_id,
        "device": str(device),
        "dtype": str(segmenter.dtype).replace("torch.", ""),
        "settings": settings.to_dict(),
        "limit": args.limit,
        "runs": runs,
        "summary": summarise(runs),
    }


def print_report(report: dict) -> None:
    print(
        f"{report['protocol']}: SAM2 {report['sam2']}, DINOv2 {report['dinov2']}, {report['device']} {report['dtype']}"
    )
    header = "".join(f"{f'{t} {m}':>13}" for t in ("bbox", "segm") for m in METRICS)
    print(f"{'run':<22}{'source':<13}{header}")
    for run in report["runs"]:
        name = "all references" if run["shots"] is None else f"{run['shots']} shots, seed {run['seed']}"
        for source in ("pycocotools", "fiftyone"):
            figures = run[source]
            if figures:
                cells = "".join(
                    f"{100 * figures[t][m]:13.1f}" if t in figures else f"{'-':>13}"
                    for t in ("bbox", "segm")
                    for m in METRICS
                )
                print(f"{name:<22}{source:<13}{cells}")
                for note in figures["notes"]:
                    print(f"  note ({source}): {note}")
        for note in run["notes"]:
            print(f"  note: {note}")
        if run["failed_images"]:
            print(f"  {len(run['failed_images'])} image(s) could not be used, e.g. {run['failed_images'][0]}")
    for shots, entry in report["summary"].items():
        if len(entry["seeds"]) > 1:
            for key in ("pycocotools_bbox_nAP", "pycocotools_segm_nAP"):
                if key in entry:
                    print(
                        f"{shots} shots, {len(entry['seeds'])} seeds, {key}: {100 * entry[key]['mean']:.1f} +- {100 * entry[key]['std']:.1f}"
                    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = run(args)
    except NttError as error:
        print(f"fsod.py: error: {error}", file=sys.stderr)
        return 2
    print_report(report)
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
