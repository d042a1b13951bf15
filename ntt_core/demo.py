"""``ntt demo``: the whole job on a small dataset, from nothing to the FiftyOne App.

A COCO-2017 validation subset from the FiftyOne zoo (or a local COCO folder) becomes a
persistent FiftyOne dataset; K ground-truth instances per class are tagged as references; the
plugin's operators build the memory bank, segment the other samples and evaluate them; a
summary is printed and the App opened (its URL printed when headless).

``--offline`` runs the same flow on generated scenes (:mod:`ntt_core.synthetic`) with the
stand-in models of :mod:`ntt_core.standins`. The operators load SAM2 and DINOv2 by name and
cannot take those objects, so there the bank is built and the samples segmented through the
library functions the operators call; evaluation goes through the operator in both modes.

Re-running replaces the dataset of the same name, if an earlier demo run made it.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .cli_common import CliError, class_choice, count_option, print_metrics, seed_option, shots_option
from .input_rules import check_seed, is_crowd
from .settings import Settings

PLUGIN = "@ntt/no-time-to-train"
GT_FIELD = "ground_truth"
PRED_FIELD = "predictions"
BANK_KEY = "demo"
EVAL_KEY = "eval"
DEMO_MARK = "ntt_demo"  # key in dataset.info of the datasets this command made (and may replace)

COCO_CLASSES = ("cat", "dog", "bus")
COCO_HOST = "http://images.cocodataset.org"
OFFLINE_CLASSES = ("disc", "square", "triangle")  # stars are drawn too, unannotated: distractors
OFFLINE_SCENE_SIZE = (144, 192)
OFFLINE_SETTINGS = Settings(points_per_side=16)  # every generated shape gets a prompt inside it

#: Layouts of a ``--coco-dir`` folder: FiftyOne's export, ``ntt_core.synthetic``, COCO's own.
COCO_LABELS = ("labels.json", "annotations.json", "annotations/instances_val2017.json")
COCO_IMAGES = ("data", "images", "val2017")

OFFLINE_BANNER = """\
##############################################################################
#  OFFLINE DEMO: generated scenes and stand-in models, NOT SAM2 and DINOv2.  #
#  The stand-ins only know flat coloured shapes. Every number below comes    #
#  from them and says nothing about the method's accuracy on real images.    #
#  Run `ntt demo` without --offline for the real models on COCO images.      #
##############################################################################"""


def add_parser(commands, formatter) -> None:
    """The ``demo`` subcommand of ``ntt``."""
    demo = commands.add_parser(
        "demo",
        help="the main job on a small real dataset, from download to the FiftyOne App",
        description="Load a COCO-2017 validation subset (FiftyOne zoo) or a local COCO folder into a FiftyOne "
        "dataset, tag K ground-truth instances per class as references, then build the memory bank, segment and "
        "evaluate the other samples through the plugin's operators, and open the App. Weights come from the Hugging "
        "Face hub or local folders. --offline runs the same flow on generated scenes with stand-in models. "
        "A re-run replaces the dataset an earlier run made.",
        formatter_class=formatter,
    )
    demo.add_argument(
        "--offline",
        action="store_true",
        help="generated scenes and stand-in models instead of COCO, SAM2 and DINOv2: checks the flow, not the method",
    )
    demo.add_argument("--dataset", help="FiftyOne dataset name (default: ntt-demo; offline ntt-demo-offline)")
    demo.add_argument(
        "--classes",
        type=class_choice,
        help=f"few-shot (the 20 COCO-FSOD novel classes), all, or names a,b,c (default: {','.join(COCO_CLASSES)}; "
        f"offline {','.join(OFFLINE_CLASSES)}; with --coco-dir all)",
    )
    demo.add_argument("--shots", type=shots_option, help="references per class, K (default: 3; offline 1)")
    demo.add_argument(
        "--max-samples", type=count_option("max_samples"), help="images to load (default: 50; offline 12)"
    )
    demo.add_argument(
        "--seed", type=seed_option, default=0, help="seed of the reference choice (and of the scenes), an integer >= 0"
    )
    demo.add_argument(
        "--coco-dir",
        type=Path,
        help="a local COCO folder instead of the zoo: images in "
        + ", ".join(f"{name}/" for name in COCO_IMAGES)
        + " and labels in "
        + ", ".join(COCO_LABELS),
    )
    demo.add_argument("--sam2", help="SAM2 hub id, short name or local folder (default: the paper's Hiera-L)")
    demo.add_argument("--dinov2", help="DINOv2 hub id, short name or local folder (default: the paper's ViT-L/14)")
    demo.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="compute device")
    demo.add_argument(
        "--points-per-side",
        type=count_option("points_per_side"),
        help="point-prompt grid side (default: the paper's 32; offline 16)",
    )
    demo.add_argument("--no-app", action="store_true", help="do not open the App at the end")
    demo.add_argument("--port", type=count_option("port"), help="App port (default: FiftyOne's, 5151)")
    demo.set_defaults(command=run_demo)


# --- the command ---


def run_demo(args: argparse.Namespace) -> None:
    """Run the demo; a missing download, a bad option or a foreign dataset is a :class:`CliError`."""
    offline = args.offline
    if offline and (args.coco_dir or args.sam2 or args.dinov2):
        raise CliError(
            "--offline uses generated scenes and stand-in models: it takes no --coco-dir, --sam2 or --dinov2"
        )
    name = args.dataset or ("ntt-demo-offline" if offline else "ntt-demo")
    shots = args.shots or (1 if offline else 3)
    max_samples = args.max_samples or (12 if offline else 50)
    settings = OFFLINE_SETTINGS if offline else Settings()
    if args.points_per_side:
        settings = settings.replace(points_per_side=args.points_per_side)
    zoo = None  # how the zoo's COCO subset is had: "download" or "local"
    if offline:
        print(OFFLINE_BANNER, flush=True)
    else:
        if args.coco_dir is not None:
            coco_folder(args.coco_dir)
        zoo = check_downloads(args)  # before anything heavy: one line naming all that is missing

    replacing = earlier_demo_exists(name)
    note = ensure_plugin()
    if note:
        print(note)
    if offline:
        steps = StandInSteps(settings)
    else:
        steps = OperatorSteps(args.sam2, args.dinov2, args.device, settings)
        print(f"loading SAM2 {steps.sam2_name} and DINOv2 {steps.dinov2_name}", flush=True)
        if steps.load().type == "cpu":
            print(
                "ntt: warning: running on CPU, where full-size models take minutes per image: "
                "try --max-samples 5, or smaller models (--sam2 sam2.1-tiny --dinov2 dinov2-small)",
                file=sys.stderr,
            )

    dataset = create_dataset(name, replacing, offline)
    classes = load_data(dataset, args, zoo, max_samples)

    chosen = tag_references(dataset, classes, shots, args.seed)
    reference_samples = sorted({sample_id for picked in chosen.values() for sample_id, _ in picked})
    targets = dataset.exclude(reference_samples)
    if len(targets) == 0:
        raise CliError(
            f"every loaded sample holds a reference: raise --max-samples (now {max_samples}) or lower --shots"
        )
    count = sum(map(len, chosen.values()))
    print(f"tagged {count} ground-truth instance(s) as references in {len(reference_samples)} sample(s)")

    bank = steps.build(dataset, classes)
    print(f"memory bank '{BANK_KEY}': " + ", ".join(f"{k}: {v}" for k, v in bank["counts"].items()))
    segmented = steps.segment(targets)
    print(f"segmented {segmented['processed']} sample(s): {segmented['instances']} instance(s) in '{PRED_FIELD}'")
    for failure in segmented["failed"]:
        print(f"ntt: warning: sample {failure['sample_id']} failed: {failure['reason']}", file=sys.stderr)
    report = evaluate(dataset)

    print_summary(dataset, targets, chosen, report)
    if offline:
        print(OFFLINE_BANNER, flush=True)
    if not args.no_app:
        open_app(dataset, args.port)


# --- availability of downloads ---


def check_downloads(args: argparse.Namespace) -> str | None:
    """How the zoo's COCO subset is had ("download" or "local"; None with ``--coco-dir``); raises
    one :class:`CliError` naming everything that can be neither found locally nor downloaded."""
    from .models import DINOV2, SAM2, ModelNotFoundError, resolve_model

    missing, zoo = [], None
    if args.coco_dir is None:
        zoo = coco_source()
        if zoo is None:
            missing.append(
                f"COCO-2017 validation (FiftyOne zoo): not downloaded and {COCO_HOST} unreachable; "
                "give a local COCO folder with --coco-dir DIR (images and an instances json)"
            )
    for kind, given in ((SAM2, args.sam2), (DINOV2, args.dinov2)):
        try:
            resolve_model(kind, given).check()
        except ModelNotFoundError as error:
            missing.append(str(error))
    if missing:
        raise CliError(
            f"the demo cannot get what it needs: {'; '.join(missing)}. "
            "(`ntt demo --offline` runs the flow on generated scenes with stand-in models)"
        )
    return zoo


def coco_source() -> str | None:
    """How to get COCO-2017 validation: "download" when the COCO site answers, "local" when the
    zoo holds a copy, else None."""
    import fiftyone.zoo as foz

    if reachable(COCO_HOST):
        return "download"
    try:
        foz.find_zoo_dataset("coco-2017", split="validation")
    except ValueError:
        return None
    return "local"


def reachable(url: str, timeout: float = 5.0) -> bool:
    """Whether ``url``'s server answers an HTTP request within ``timeout`` seconds (proxies honoured;
    name resolution included, which socket timeouts do not bound)."""
    import requests

    answered = []

    def ask() -> None:
        try:
            requests.head(url, timeout=timeout, allow_redirects=False)
            answered.append(True)
        except requests.RequestException:
            pass

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


# --- set-up ---


def ensure_plugin() -> str | None:
    """Make the plugin's operators findable; returns a note when it linked the plugin into
    FiftyOne's plugins folder."""
    import fiftyone as fo
    import fiftyone.operators as foo

    uri = f"{PLUGIN}/build_memory_bank"
    try:
        foo.get_operator(uri)
        return None
    except ValueError:
        pass
    repo = Path(__file__).resolve().parents[1]
    link = Path(fo.config.plugins_dir) / "ntt-no-time-to-train"
    if not (repo / "fiftyone.yml").is_file() or link.exists() or link.is_symlink():
        raise CliError(
            f"FiftyOne does not find the plugin {PLUGIN} in {fo.config.plugins_dir}: put a copy of the repository "
            "(with fiftyone.yml) there, or set FIFTYONE_PLUGINS_DIR to a folder that holds one"
        )
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(repo, target_is_directory=True)
    foo.get_operator(uri)
    return f"installed the plugin {PLUGIN}: {link} -> {repo}"


def earlier_demo_exists(name: str) -> bool:
    """Whether dataset ``name`` exists (made by an earlier demo, so it may be replaced); any other
    dataset of that name is refused."""
    import fiftyone as fo

    if not fo.dataset_exists(name):
        return False
    if DEMO_MARK not in fo.load_dataset(name).info:
        raise CliError(f"dataset '{name}' exists and was not made by `ntt demo`: choose another --dataset name")
    return True


# --- data ---


def create_dataset(name: str, replacing: bool, offline: bool):
    """A new persistent dataset marked as the demo's, replacing an earlier demo's."""
    import fiftyone as fo

    if replacing:
        fo.delete_dataset(name)
    dataset = fo.Dataset(name, persistent=True)
    dataset.info[DEMO_MARK] = "offline: generated scenes, stand-in models" if offline else "SAM2 + DINOv2"
    if offline:
        dataset.description = "OFFLINE DEMO: generated scenes, stand-in models (not SAM2/DINOv2)"
    dataset.save()
    print(f"dataset '{name}': " + ("replaces the one an earlier demo run made" if replacing else "created"))
    return dataset


def load_data(dataset, args: argparse.Namespace, zoo: str | None, max_samples: int) -> list[str]:
    """Images and ground truth into ``dataset`` from the source the options choose; returns the classes."""
    classes = args.classes
    if args.offline:
        images, labels = write_scenes(dataset.name, max_samples, args.seed)
        classes = classes or list(OFFLINE_CLASSES)
    elif args.coco_dir is not None:
        images, labels = coco_folder(args.coco_dir)
    else:
        classes = classes or list(COCO_CLASSES)
        images, labels = download_coco(classes, max_samples, download=zoo == "download")
    return import_coco(dataset, images, labels, classes, max_samples)


def write_scenes(name: str, count: int, seed: int) -> tuple[Path, Path]:
    """``count`` generated scenes as a COCO folder under FiftyOne's dataset folder; (images, labels)."""
    import fiftyone as fo

    from .synthetic import CLASSES, IMAGES_DIR, make_dataset, write_coco_folder

    folder = Path(fo.config.default_dataset_dir) / "ntt-demo-scenes" / "".join(c if c.isalnum() else "_" for c in name)
    scenes = make_dataset(count, seed=seed, size=OFFLINE_SCENE_SIZE, classes=CLASSES)
    labels = write_coco_folder(scenes, folder)
    return folder / IMAGES_DIR, labels


def coco_folder(folder: Path) -> tuple[Path, Path]:
    """(images, labels json) of a ``--coco-dir`` folder in one of the known layouts."""
    if not folder.is_dir():
        raise CliError(f"--coco-dir {folder}: no such folder")
    labels = next((folder / name for name in COCO_LABELS if (folder / name).is_file()), None)
    images = next((folder / name for name in COCO_IMAGES if (folder / name).is_dir()), None)
    missing = [f"labels json ({' / '.join(COCO_LABELS)})"] if labels is None else []
    missing += [f"images folder ({' / '.join(COCO_IMAGES)})"] if images is None else []
    if missing:
        raise CliError(f"--coco-dir {folder}: no {' and no '.join(missing)} in it")
    return images, labels


def download_coco(classes: str | Sequence[str], max_samples: int, download: bool) -> tuple[Path, Path]:
    """The zoo's COCO-2017 validation split, downloading the images the subset needs if ``download``."""
    import fiftyone.zoo as foz

    from .coco import FEW_SHOT_CLASSES

    if download:
        names = list(FEW_SHOT_CLASSES) if classes == "few-shot" else None if classes == "all" else list(classes)
        print(f"downloading COCO-2017 validation: up to {max_samples} images of {', '.join(names or ['any class'])}")
        try:
            foz.download_zoo_dataset(
                "coco-2017", split="validation", label_types=["segmentations"], classes=names, max_samples=max_samples
            )
        except Exception as error:  # any failed download ends the same way: say what is missing
            reason = " ".join(str(error).split())
            raise CliError(
                f"COCO-2017 validation could not be downloaded ({reason}); give a local COCO folder with --coco-dir DIR"
            ) from None
    split = Path(foz.find_zoo_dataset("coco-2017", split="validation"))
    return split / "data", split / "labels.json"


def import_coco(dataset, images: Path, labels: Path, classes: Sequence[str] | None, max_samples: int) -> list[str]:
    """Up to ``max_samples`` images holding ``classes`` (None: every category) into ``dataset``,
    their masks in ``ground_truth``; returns the classes."""
    import fiftyone as fo

    from .coco import load_coco, resolve_classes

    categories = resolve_classes(load_coco(labels), classes, str(labels))
    names = [category["name"] for category in categories]
    dataset.add_dir(
        dataset_type=fo.types.COCODetectionDataset,
        data_path=str(images),
        labels_path=str(labels),
        label_types=["segmentations"],
        label_field=GT_FIELD,
        classes=names,
        only_matching=True,
        max_samples=max_samples,
    )
    if len(dataset) == 0:
        raise CliError(f"{labels}: no image with any of the classes {', '.join(names)}")
    dataset.compute_metadata()
    print(f"loaded {len(dataset)} image(s) from {images}")
    return names


# --- references ---


def tag_references(dataset, classes: Sequence[str], shots: int, seed: int) -> dict[str, list[tuple[str, str]]]:
    """Tag ``shots`` ground-truth instances per class, from distinct samples, as references.

    The paper's rule first (not crowd, box at least 32 px, 10 px from the borders; see
    :func:`ntt_core.coco.is_valid_reference`), in an order shuffled by ``seed``; smaller non-crowd
    instances fill in where a class has too few. Returns (sample id, label id) per class.
    """
    from .coco import is_valid_reference
    from .fiftyone.references import DEFAULT_REFERENCE_TAG

    check_seed(seed)
    candidates = {name: [] for name in classes}
    for sample_id, width, height, labels in zip(
        *dataset.values(["id", "metadata.width", "metadata.height", f"{GT_FIELD}.detections"])
    ):
        if not (labels and width and height):  # no labels, or an image whose size could not be read
            continue
        for label in labels:
            if label.label not in candidates or is_crowd(label):
                continue
            x, y, w, h = label.bounding_box
            box = {"bbox": [x * width, y * height, w * width, h * height]}
            valid = is_valid_reference(box, {"width": width, "height": height})
            candidates[label.label].append((not valid, sample_id, label.id))
    generator = random.Random(seed)
    chosen = {}
    for name, found in candidates.items():
        generator.shuffle(found)
        found.sort(key=lambda candidate: candidate[0])  # stable: the valid ones first, shuffled within
        picked, used = [], set()
        for _, sample_id, label_id in found:
            if sample_id not in used:
                picked.append((sample_id, label_id))
                used.add(sample_id)
            if len(picked) == shots:
                break
        if not picked:
            raise CliError(f"class '{name}' has no usable instance in the loaded samples: raise --max-samples")
        if len(picked) < shots:
            print(
                f"ntt: warning: class '{name}': {len(picked)} reference(s) from distinct images, {shots} asked",
                file=sys.stderr,
            )
        chosen[name] = picked
    label_ids = [label_id for picked in chosen.values() for _, label_id in picked]
    dataset.select_labels(ids=label_ids, fields=GT_FIELD).tag_labels(DEFAULT_REFERENCE_TAG, label_fields=GT_FIELD)
    return chosen


# --- the method's steps ---


def operator(name: str):
    import fiftyone.operators as foo

    return foo.get_operator(f"{PLUGIN}/{name}")


@dataclass
class OperatorSteps:
    """Build and segment through the plugin's operators, the way the App runs them."""

    sam2: str | None
    dinov2: str | None
    device: str
    settings: Settings

    @property
    def sam2_name(self) -> str:
        from .models import DEFAULT_SAM2

        return self.sam2 or DEFAULT_SAM2

    @property
    def dinov2_name(self) -> str:
        from .models import DEFAULT_DINOV2

        return self.dinov2 or DEFAULT_DINOV2

    def load(self):
        """Load the models into the models module's per-process cache, which the operators read (the
        call matches theirs); returns the device they run on."""
        from .models import load_models

        segmenter, _ = load_models(self.sam2, self.dinov2, device=self.device)
        return segmenter.device

    def _models(self) -> dict:
        return dict(sam2=self.sam2 or "", dinov2=self.dinov2 or "", device=self.device)

    def build(self, dataset, classes: Sequence[str]) -> dict:
        return operator("build_memory_bank")(
            dataset, GT_FIELD, bank_key=BANK_KEY, classes=list(classes), **self._models()
        )["report"]

    def segment(self, targets) -> dict:
        s = self.settings
        return operator("segment_by_reference")(
            targets,
            BANK_KEY,
            pred_field=PRED_FIELD,
            points_per_side=s.points_per_side,
            sam_iou_threshold=s.sam_iou_threshold,
            max_detections=s.max_detections,
            score_threshold=s.score_threshold,
            **self._models(),
        )["report"]


class StandInSteps:
    """Build and segment with the stand-in models, through the library functions the operators call."""

    def __init__(self, settings: Settings) -> None:
        from .standins import ColourStatsEncoder, ConnectedRegionSegmenter

        self.settings = settings
        self.segmenter = ConnectedRegionSegmenter(input_size=192, mask_size=96)
        self.encoder = ColourStatsEncoder(input_size=112, grid_size=14)

    def build(self, dataset, classes: Sequence[str]) -> dict:
        from .fiftyone.building import build_dataset_memory_bank

        return build_dataset_memory_bank(
            dataset, BANK_KEY, GT_FIELD, self.segmenter, self.encoder, classes=classes, settings=self.settings
        )

    def segment(self, targets) -> dict:
        from .fiftyone.predictions import segment_by_reference

        return segment_by_reference(targets, BANK_KEY, PRED_FIELD, self.segmenter, self.encoder, settings=self.settings)


def evaluate(dataset) -> dict:
    """The evaluation operator: FiftyOne's COCO evaluation with masks, plus pycocotools."""
    return operator("evaluate_by_reference")(dataset, PRED_FIELD, eval_key=EVAL_KEY, gt_field=GT_FIELD)["report"]


# --- output ---


def print_summary(dataset, targets, chosen: dict, report: dict) -> None:
    """Per-class counts and AP on the evaluated samples, then the COCO figures."""
    from fiftyone import ViewField as F

    results = dataset.load_evaluation_results(EVAL_KEY)
    truth = targets.count_values(f"{GT_FIELD}.detections.label")
    predicted = targets.count_values(f"{PRED_FIELD}.detections.label")
    matched = targets.filter_labels(PRED_FIELD, F(EVAL_KEY) == "tp").count_values(f"{PRED_FIELD}.detections.label")
    print(f"\nevaluated {report['samples']} sample(s) (those holding references left out)")
    print(f"{'class':<16}{'references':>11}{'truth':>8}{'predicted':>10}{'TP@.5':>8}{'AP':>8}")
    for name in report["classes"]:
        ap = results.mAP(classes=[name])
        cell = f"{100 * ap:8.1f}" if ap >= 0 else f"{'-':>8}"
        print(
            f"{name:<16}{len(chosen[name]):>11}{truth.get(name, 0):>8}{predicted.get(name, 0):>10}"
            f"{matched.get(name, 0):>8}{cell}"
        )
    kind = "masks" if report["use_masks"] else "boxes"
    print(f"\nFiftyOne COCO mAP ({kind}): {100 * report['mAP']:.1f}  (eval key '{EVAL_KEY}')")
    print("pycocotools:")
    print_metrics(report["pycocotools"])
    for note in report["notes"]:
        print(f"note: {note}")


def open_app(dataset, port: int | None) -> None:
    """Open the App on ``dataset`` and wait; headless, print its URL instead of opening a browser."""
    import fiftyone as fo

    remote = headless()
    session = fo.launch_app(dataset, port=port, remote=remote)
    url = session.url.replace("://0.0.0.0:", "://localhost:")
    if remote:
        port = session.server_port
        tunnel = f"ssh -N -L {port}:localhost:{port} HOST"
        where = f"no display here: open it in a browser on this machine, or forward the port ({tunnel})"
    else:
        where = "opened in your browser"
    print(f"App: {url} ({where}); dataset '{dataset.name}'. Ctrl+C stops it.", flush=True)
    try:
        session.wait(-1 if remote else 3)
    except KeyboardInterrupt:
        pass


def headless() -> bool:
    """No display to open a browser on (a Linux machine without X/Wayland, or an SSH session)."""
    if os.environ.get("SSH_CONNECTION"):
        return True
    return sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
