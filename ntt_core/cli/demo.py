"""``ntt demo``: its options, the flow from set-up to the App, and the summary it prints (the
set-up and the steps are in :mod:`ntt_core.demo`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..demo import BANK_KEY, EVAL_KEY, GT_FIELD, PRED_FIELD
from ..demo.datasets import create_dataset, earlier_demo_exists, load_data
from ..demo.plugin_link import ensure_plugin
from ..demo.sources import COCO_CLASSES, COCO_IMAGES, COCO_LABELS, OFFLINE_CLASSES, check_downloads, coco_folder
from ..demo.steps import OFFLINE_SETTINGS, OperatorSteps, StandInSteps, evaluate, tag_references
from ..settings import Settings
from .options import CliError, class_choice, count_option, seed_option, shots_option
from .output import print_metrics

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
    demo.set_defaults(command=run)


def run(args: argparse.Namespace) -> None:
    """Run the demo; a bad option is a :class:`CliError`, a missing download or a foreign dataset a
    :class:`~ntt_core.demo.DemoError`."""
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
        # before anything heavy: one line naming all that is missing
        zoo = check_downloads(args.coco_dir, args.sam2, args.dinov2)

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
    classes = load_data(
        dataset, args.classes, max_samples, offline=offline, coco_dir=args.coco_dir, zoo=zoo, seed=args.seed
    )

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
