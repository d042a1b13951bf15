"""``ntt``: the COCO-folder workflow from the command line.

    ntt sample-references --annotations A.json --shots K --seed S --out refs.json
    ntt build-memory --references refs.json --images DIR --out BANK_DIR
    ntt predict --memory BANK_DIR --images DIR [--targets T.json] --out results.json
    ntt evaluate --targets T.json --results results.json [--classes few-shot]
    ntt demo [--offline]      (the whole job on a small dataset, in FiftyOne; see ntt_core.demo)
    ntt models download|list|files   (the weights ahead of time; see ntt_core.model_downloads)
    ntt shards DATASET        (the shards of sharded runs and their heartbeats; see ntt_core.shards)

Exit status: 0 done; 1 every image failed (nothing written); 2 bad input, refused before any
work with one line ``ntt: error: <reason>``; 3 done, but some images were skipped (their count
and first reasons on stderr); 130 interrupted (Ctrl-C; ``predict`` resumes with ``--resume``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from .cli_common import (
    CliError,
    class_choice,
    count_option,
    fraction,
    non_negative_float,
    print_metrics,
    seed_option,
    shots_option,
)
from .coco import (
    CocoFormatError,
    ResultsWriter,
    evaluate,
    instances_to_coco_results,
    list_images,
    load_coco,
    make_targets,
    references_from_coco,
    resolve_classes,
    sample_references,
    write_json,
)
from .errors import NttError
from .images import ImageError
from .input_rules import CROWD_REASON, is_crowd
from .settings import Settings

PAPER = Settings()  # the paper's defaults

logger = logging.getLogger("ntt_core.cli")


#: Exit statuses (see the module docstring).
EXIT_OK, EXIT_ALL_FAILED, EXIT_BAD_INPUT, EXIT_SOME_SKIPPED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_HELP = (
    "exit status: 0 done; 1 every image failed (nothing written); 2 bad input (one line, nothing done); "
    "3 done, but some images were skipped (their count and first reasons on stderr); "
    "130 interrupted (predict: run the same command with --resume to finish)"
)
#: Reasons shown when images are skipped or fail.
SHOWN_REASONS = 3


class Interrupted(Exception):
    """A run stopped by Ctrl-C; the message says what was kept and how to go on."""


def main(argv: list[str] | None = None) -> int:
    """Run one ``ntt`` subcommand; returns the exit status."""
    args = build_parser().parse_args(argv)
    _log_warnings_to_stderr()
    try:
        return args.command(args) or EXIT_OK
    except (Interrupted, KeyboardInterrupt) as stop:
        print(f"ntt: interrupted{': ' + str(stop) if str(stop) else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (NttError, OSError) as error:  # bad input: one line, nothing done
        reason = " ".join(str(error).split())
        print(f"ntt: error: {reason}", file=sys.stderr)
        return EXIT_BAD_INPUT


# --- argument parsing ---


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ntt",
        description="Training-free reference-based instance segmentation (No Time to Train!) on COCO-format folders.",
        epilog=EXIT_HELP,
    )
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    formatter = _HelpFormatter

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
    sample.set_defaults(command=run_sample_references)

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
    _add_model_options(build)
    build.set_defaults(command=run_build_memory)

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
    predict.add_argument("--batch-size", default=1, type=count_option("batch_size"), help="images per forward pass")
    _add_model_options(predict)
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
    predict.set_defaults(command=run_predict)

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
    assess.set_defaults(command=run_evaluate)

    from . import demo, model_downloads, shards

    demo.add_parser(commands, formatter)
    model_downloads.add_parser(commands, formatter)
    shards.add_parser(commands, formatter)
    return parser


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except absent ones (None) and off switches."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("models")
    group.add_argument(
        "--sam2",
        help="SAM2: short name (sam2-large, sam2.1-tiny...), hub id, local folder or Meta .pt (default: the paper's Hiera-L)",
    )
    group.add_argument(
        "--dinov2",
        help="DINOv2: short name (dinov2-large...), hub id, local folder or Meta .pth (default: the paper's ViT-L/14)",
    )
    group.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    group.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16"),
        help="compute dtype (auto: float32, as the authors ran; bfloat16 is faster on GPUs, unmeasured for accuracy)",
    )
    group.add_argument(
        "--encoder-size",
        type=count_option("encoder_size"),
        help="DINOv2 input side in pixels (default: the model's, 518)",
    )


def _settings(args: argparse.Namespace) -> Settings:
    """The paper's settings with the options this command has."""
    names = [field.name for field in dataclasses.fields(Settings) if hasattr(args, field.name)]
    return PAPER.replace(**{name: getattr(args, name) for name in names})


# --- commands ---


def run_sample_references(args: argparse.Namespace) -> None:
    check_outputs([("--out", args.out)], overwrite=True)
    coco = load_coco(args.annotations)
    sampled = sample_references(coco, args.shots, args.seed, args.classes, args.seed_scope)
    write_json(sampled, args.out)
    print(
        f"wrote {len(sampled['annotations'])} references of {len(sampled['categories'])} classes "
        f"from {len(sampled['images'])} images to {args.out}"
    )


def run_build_memory(args: argparse.Namespace) -> None:
    import torch
    from tqdm import tqdm

    from .memory_bank import build_memory_bank

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

    settings = _settings(args)
    device = _device(args.device)
    encoder = _encoder(args, device, settings.encoder_size)
    segmenter = _segmenter(args, device, settings) if any(instance.mask is None for instance in instances) else None
    if device.type == "cpu":
        size = encoder.input_size
        seconds = _seconds(lambda: encoder.encode(torch.zeros(1, 3, size, size))) * len(instances)
        if segmenter is not None:
            frame = segmenter.input_size
            with_boxes = sum(any(instance.mask is None for instance in reference.instances) for reference in references)
            seconds += _seconds(lambda: segmenter.embed(torch.zeros(1, 3, frame, frame))) * with_boxes
        _estimate(seconds, f"{len(instances)} reference instances")

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


def run_predict(args: argparse.Namespace) -> int:
    """Segment the images, recording each finished one in a journal beside ``--out`` (see
    :mod:`ntt_core.journal`); the results (and targets) files are written from it at the end."""
    from tqdm import tqdm

    from .journal import Journal, check_resumable, journal_path
    from .memory_bank import MANIFEST_NAME, MemoryBank
    from .predictor import Predictor
    from .settings import MEMORY_ONLY

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

    settings = _settings(args)
    run = {  # what a resumed run must share with the interrupted one; the models' part once loaded
        "bank": hashlib.sha256((args.memory / MANIFEST_NAME).read_bytes()).hexdigest(),
        "settings": {name: value for name, value in settings.to_dict().items() if name not in MEMORY_ONLY},
        "images": [str(args.images.resolve()), images],
        "category_ids": category_ids,
    }
    if resuming:
        check_resumable(journal_file, run)  # before the models load
    device = _device(args.device)
    segmenter = _segmenter(args, device, settings)
    encoder = _encoder(args, device, settings.encoder_size or bank.encoder_input_size)
    predictor = Predictor(segmenter, encoder, bank, settings)
    run.update(
        segmenter=segmenter.fingerprint,
        encoder=encoder.fingerprint,
        dtype=[str(segmenter.dtype), str(encoder.dtype)],  # bfloat16 results differ from float32 ones
    )
    journal = Journal.resume(journal_file, run) if resuming else Journal.create(journal_file, run)
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
    """Predict the ``(index, (image_id, file_name, size))`` items of ``todo`` in batches, appending
    one journal record per image (its COCO results, or why it failed); stops between batches
    once ``stop_requested()``."""
    from tqdm import tqdm

    first = 1 if device.type == "cpu" else args.batch_size
    batches = [todo[:first]] + [todo[i : i + args.batch_size] for i in range(first, len(todo), args.batch_size)]
    with tqdm(total=total, initial=total - len(todo), desc="segmenting", unit="image") as bar:
        for number, batch in enumerate(batches):
            if not batch or stop_requested():
                break
            start = time.perf_counter()
            outputs = predictor.predict_paths([args.images / name for _, (_, name, _) in batch])
            if number == 0 and device.type == "cpu" and len(todo) > 1:
                _estimate((time.perf_counter() - start) * (len(todo) - 1), f"the other {len(todo) - 1} images")
            for (index, (image_id, name, size)), output in zip(batch, outputs):
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
            bar.update(len(batch))


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
        _replace_json(make_targets(done, classes), targets_path)
        written += f" (image and category ids in {targets_path})"
    journal.remove()
    print(written)
    if failed:
        logger.warning(f"{len(failed)} of {len(images)} images skipped: {_first(failed)}")
        return EXIT_SOME_SKIPPED
    return EXIT_OK


def _first(reasons: list[str]) -> str:
    return "; ".join(reasons[:SHOWN_REASONS]) + ("; ..." if len(reasons) > SHOWN_REASONS else "")


def check_outputs(outputs: list[tuple[str, Path]], overwrite: bool) -> None:
    """Raise unless each ``(what, path)`` can be written as a file: not a folder, in a folder that
    exists or can be made and is writable, and (unless ``overwrite``) not there yet."""
    for what, path in outputs:
        if path.is_dir():
            raise CliError(f"{what} {path} is a folder: give a file name")
        if path.exists() and not overwrite:
            raise CliError(f"{what} {path} exists: add --overwrite to replace it")
        _check_writable_folder(what, path)


def check_bank_folder(path: Path, overwrite: bool) -> None:
    """Raise unless a memory bank can be saved into folder ``path``: new, empty, or (with
    ``overwrite``) a memory bank already."""
    from .memory_bank import MANIFEST_NAME

    if path.exists() and not path.is_dir():
        raise CliError(f"--out {path} is a file, not a memory bank folder: give a folder name")
    if path.is_dir() and any(path.iterdir()):
        if not (path / MANIFEST_NAME).is_file():
            raise CliError(f"--out {path} is a folder that is not a memory bank: give a new or empty folder")
        if not overwrite:
            raise CliError(f"--out {path} holds a memory bank: add --overwrite to replace it")
    _check_writable_folder("--out", path)


def _check_writable_folder(what: str, path: Path) -> None:
    """Raise unless the nearest existing folder above ``path`` is a writable folder."""
    above = path.absolute().parent
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise CliError(f"{what} {path}: {above} is a file, not a folder")
    if not os.access(above, os.W_OK):
        raise CliError(f"{what} {path}: the folder {above} is not writable")


def _replace_json(data, path: Path) -> None:
    """Write ``data`` as json to ``path`` through a temporary file, so ``path`` is never half-written."""
    partial = path.with_name(path.name + ".partial")
    write_json(data, partial)
    os.replace(partial, path)


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


def run_evaluate(args: argparse.Namespace) -> None:
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


# --- helpers ---


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


def _device(name: str):
    from .models import choose_device

    try:
        return choose_device(name)
    except RuntimeError as error:  # an unknown or unavailable device
        raise CliError(f"--device {name}: {error}") from None


def _segmenter(args: argparse.Namespace, device, settings):
    from .models import load_segmenter

    return load_segmenter(args.sam2, device, args.dtype, settings.add_no_memory_embedding)


def _encoder(args: argparse.Namespace, device, input_size: int | None):
    from .models import load_encoder

    return load_encoder(args.dinov2, device, args.dtype, input_size)


def _seconds(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def _estimate(seconds: float, what: str) -> None:
    from tqdm import tqdm

    amount = f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"
    tqdm.write(f"ntt: on CPU, about {amount} for {what}", file=sys.stderr)


class _StderrHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        print(f"ntt: {record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)


def _log_warnings_to_stderr() -> None:
    """Show the library's warnings (short classes, skipped references) as ``ntt: warning: ...``."""
    package = logging.getLogger("ntt_core")
    if not any(isinstance(handler, _StderrHandler) for handler in package.handlers):
        package.addHandler(_StderrHandler(logging.WARNING))


if __name__ == "__main__":
    sys.exit(main())
