"""``ntt predict``: segment a folder of images into a COCO results json.

Each finished image is recorded in a journal beside ``--out`` (see :mod:`ntt_core.journal`), so an
interrupted run resumes; the first Ctrl-C stops after the current image, a second one at once."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import signal
import sys
import threading
import time
from pathlib import Path

from ..candidate_cache import DEFAULT_MAX_BYTES, CandidateCache, default_folder
from ..coco import CocoFormatError, ResultsWriter, instances_to_coco_results, list_images, load_coco, make_targets
from ..images import ImageError
from .options import (
    EXIT_ALL_FAILED,
    EXIT_HELP,
    EXIT_OK,
    EXIT_SOME_SKIPPED,
    PAPER,
    CliError,
    Interrupted,
    add_model_options,
    count_option,
    fraction,
    load_device,
    load_encoder,
    load_segmenter,
    positive_float,
    settings_from,
)
from .output import check_outputs, estimate, replace_json

logger = logging.getLogger(__name__)

#: Reasons shown when images are skipped or fail.
SHOWN_REASONS = 3


def add_parser(commands, formatter) -> None:
    predict = commands.add_parser(
        "predict",
        help="segment every instance of the bank's classes in a folder of images",
        description="Write COCO results json (RLE masks). Without --targets, image ids follow the sorted file "
        "names and category ids the bank's classes (1-based); a targets json with both is written beside the results. "
        "Finished images are kept in <out>.journal until the results are written, so an interrupted run resumes.",
        epilog=EXIT_HELP,
        formatter_class=formatter,
    )
    predict.add_argument("--memory", required=True, type=Path, help="memory bank folder (from build-memory)")
    predict.add_argument("--images", required=True, type=Path, help="folder of target images")
    predict.add_argument("--targets", type=Path, help="COCO json of the targets: image ids, file names, category ids")
    predict.add_argument("--out", required=True, type=Path, help="COCO results json to write")
    restart = predict.add_mutually_exclusive_group()
    restart.add_argument(
        "--resume",
        action="store_true",
        help="finish an interrupted run (same bank, models, settings, images): its finished images are kept",
    )
    restart.add_argument(
        "--overwrite", action="store_true", help="replace existing results (and an interrupted run's journal)"
    )
    cache = predict.add_mutually_exclusive_group()
    cache.add_argument(
        "--cache",
        type=Path,
        metavar="DIR",
        help="candidate cache folder: each image's bank-independent work (SAM2 candidates, DINOv2 descriptors) is "
        "kept there, so a later run with an edited bank only re-scores (default: $NTT_CACHE_DIR or ~/.cache/ntt/candidates)",
    )
    cache.add_argument("--no-cache", action="store_true", help="neither read nor write the candidate cache")
    predict.add_argument(
        "--cache-limit",
        type=positive_float,
        default=DEFAULT_MAX_BYTES / 2**30,
        metavar="GIB",
        help="size limit of the cache folder, GiB (least recently used entries go first)",
    )
    predict.add_argument("--batch-size", default=1, type=count_option("batch_size"), help="images per forward pass")
    add_model_options(predict)
    for option, kind, text in (
        ("--points-per-side", count_option("points_per_side"), "point-prompt grid side"),
        (
            "--prompt-batch-size",
            count_option("prompt_batch_size"),
            "point prompts decoded at once (default: 256 on a GPU, 64 on CPU)",
        ),
        ("--sam-iou-threshold", fraction, "drop candidates whose SAM2 predicted IoU is at or below this"),
        ("--nms-iou-threshold", fraction, "box NMS IoU"),
        ("--pre-merge-keep", count_option("pre_merge_keep"), "candidates kept after NMS"),
        ("--max-detections", count_option("max_detections"), "instances kept per image"),
        ("--score-threshold", fraction, "drop instances scoring below this"),
    ):
        predict.add_argument(option, type=kind, default=getattr(PAPER, option[2:].replace("-", "_")), help=text)
    predict.add_argument(
        "--add-no-memory-embedding",
        action="store_true",
        help="add SAM2's learned no-memory embedding (the paper does not)",
    )
    predict.set_defaults(command=run)


def run(args: argparse.Namespace) -> int:
    """Segment the images, recording each finished one in a journal beside ``--out`` (see
    :mod:`ntt_core.journal`); the results (and targets) files are written from it at the end."""
    from tqdm import tqdm

    from ..journal import Journal, check_resumable, journal_path
    from ..memory_bank import MANIFEST_NAME, MemoryBank
    from ..predictor import Predictor
    from ..settings import MEMORY_ONLY

    journal_file = journal_path(args.out)
    targets_path = None if args.targets is not None else args.out.with_name(args.out.stem + "_targets.json")
    resuming = args.resume and journal_file.is_file()
    outputs = [("--out", args.out), ("the targets file", targets_path)]
    check_outputs([(what, path) for what, path in outputs if path is not None], args.overwrite or resuming)
    partials = [("a temporary file", path.with_name(path.name + ".partial")) for _, path in outputs if path is not None]
    check_outputs([("the journal", journal_file), *partials], True)  # ours: replaced, unless a folder is there
    if journal_file.exists() and not (args.resume or args.overwrite):
        raise CliError(
            f"{journal_file}: an interrupted run into {args.out} exists: add --resume to finish it "
            "or --overwrite to start again"
        )

    bank = MemoryBank.load(args.memory)
    if args.targets is not None:
        targets = load_coco(args.targets, require_annotations=False)
        images = [(image["id"], image["file_name"], (image["height"], image["width"])) for image in targets["images"]]
        by_name = {category["name"]: category["id"] for category in targets["categories"]}
        missing = [name for name in bank.classes if name not in by_name]
        if missing:
            raise CocoFormatError(
                f"{args.targets}: no category for the bank's class(es) {', '.join(map(repr, missing))}"
            )
        category_ids = {name: by_name[name] for name in bank.classes}
    else:
        images = [(i + 1, name, None) for i, name in enumerate(list_images(args.images))]
        category_ids = {name: i + 1 for i, name in enumerate(bank.classes)}
    if not images:
        raise CocoFormatError(f"{args.targets or args.images}: no images to segment")

    settings = settings_from(args)
    identity = {  # what a resumed run must share with the interrupted one; the models' part once loaded
        "bank": hashlib.sha256((args.memory / MANIFEST_NAME).read_bytes()).hexdigest(),
        "settings": {name: value for name, value in settings.to_dict().items() if name not in MEMORY_ONLY},
        "images": [str(args.images.resolve()), images],
        "category_ids": category_ids,
    }
    if resuming:
        check_resumable(journal_file, identity)  # before the models load
    device = load_device(args.device)
    segmenter = load_segmenter(args, device, settings)
    encoder = load_encoder(args, device, settings.encoder_size or bank.encoder_input_size)
    cache = None if args.no_cache else CandidateCache(args.cache or default_folder(), round(args.cache_limit * 2**30))
    predictor = Predictor(segmenter, encoder, bank, settings, cache=cache)
    identity.update(
        segmenter=segmenter.fingerprint,
        encoder=encoder.fingerprint,
        dtype=[str(segmenter.dtype), str(encoder.dtype)],  # bfloat16 results differ from float32 ones
    )
    journal = Journal.resume(journal_file, identity) if resuming else Journal.create(journal_file, identity)
    if resuming:
        tqdm.write(f"ntt: resuming: {len(journal.records)} of {len(images)} images already done", file=sys.stderr)
    elif args.resume:
        tqdm.write(f"ntt: nothing to resume ({journal_file} not found): starting from the first image", file=sys.stderr)
    todo = [(index, image) for index, image in enumerate(images) if index not in journal.records]
    try:
        with _stop_after_current_image() as stop_requested:
            _segment_into(journal, predictor, todo, len(images), args, device, stop_requested)
    except KeyboardInterrupt:  # a second Ctrl-C stops at once; the finished images are in the journal
        pass
    if len(journal.records) < len(images):
        journal.close()
        raise Interrupted(
            f"{len(journal.records)} of {len(images)} images done, kept in {journal_file}; "
            "run the same command with --resume to finish"
        )
    try:
        return _finish_predict(journal, images, bank.classes, args.out, targets_path)
    except KeyboardInterrupt:  # the journal is complete: a resume only writes the results
        raise Interrupted(
            f"all {len(images)} images done, kept in {journal_file}; run the same command with --resume "
            "to write the results"
        ) from None


def _segment_into(journal, predictor, todo: list, total: int, args, device, stop_requested) -> None:
    """Predict the ``(index, (image_id, file_name, size))`` items of ``todo``, appending one journal
    record per image (its COCO results, or why it failed); stops between batches once
    ``stop_requested()``. On CPU the first batch is one image, for an early time estimate."""
    from tqdm import tqdm

    on_cpu = device.type == "cpu"
    paths = [args.images / name for _, (_, name, _) in todo]
    first = 1 if on_cpu else None
    stream = predictor.predict_stream(paths, args.batch_size, first_batch_size=first, should_stop=stop_requested)
    with tqdm(total=total, initial=total - len(todo), desc="segmenting", unit="image") as bar:
        start = time.perf_counter()
        for position, output in stream:
            if position == 0 and on_cpu and len(todo) > 1:
                estimate((time.perf_counter() - start) * (len(todo) - 1), f"the other {len(todo) - 1} images")
            index, (image_id, name, size) = todo[position]
            record, results = {"index": index, "file_name": name}, None
            if isinstance(output, ImageError):
                record["failed"] = str(output)
            elif size is not None and tuple(output.image_size) != tuple(size):
                record["failed"] = (
                    f"{name}: image is {output.image_size[1]}x{output.image_size[0]} px "
                    f"but {args.targets} says {size[1]}x{size[0]}"
                )
            else:
                record["size"] = list(output.image_size)
                results = instances_to_coco_results(output, image_id, journal.run["category_ids"])
            journal.append(record, results)
            bar.update(1)


def _finish_predict(journal, images: list, classes, out: Path, targets_path: Path | None) -> int:
    """Write the results (and targets) from a complete journal, then remove it; returns the exit status."""
    records = [journal.records[index] for index in range(len(images))]
    failed = [record["failed"] for record in records if "failed" in record]
    if len(failed) == len(images):
        journal.remove()
        print(f"ntt: error: every image failed ({len(failed)}): {_first(failed)}", file=sys.stderr)
        return EXIT_ALL_FAILED
    with ResultsWriter(out) as writer:
        for _, results in journal.payloads():  # in image order: images are done in order
            writer.write(results or [])
    written = f"wrote {writer.count} results for {len(images) - len(failed)} images to {out}"
    if targets_path is not None:
        done = [(images[i][0], images[i][1], r["size"]) for i, r in enumerate(records) if "size" in r]
        replace_json(make_targets(done, classes), targets_path)
        written += f" (image and category ids in {targets_path})"
    journal.remove()
    print(written)
    if failed:
        logger.warning(f"{len(failed)} of {len(images)} images skipped: {_first(failed)}")
        return EXIT_SOME_SKIPPED
    return EXIT_OK


def _first(reasons: list[str]) -> str:
    return "; ".join(reasons[:SHOWN_REASONS]) + ("; ..." if len(reasons) > SHOWN_REASONS else "")


@contextlib.contextmanager
def _stop_after_current_image():
    """Within it, the first Ctrl-C only asks to stop (the yielded test turns true) and a second one
    raises ``KeyboardInterrupt``; outside the main thread, where signals cannot be caught, Ctrl-C is untouched."""
    requested: list[int] = []

    def ask_to_stop(signum, frame) -> None:
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)
        print("ntt: stopping after the current image (Ctrl-C again to stop now)", file=sys.stderr)

    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = signal.signal(signal.SIGINT, ask_to_stop)
    try:
        yield lambda: bool(requested)
    finally:
        signal.signal(signal.SIGINT, previous)
