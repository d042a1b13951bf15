"""Kill test of ``ntt predict``: SIGKILL and SIGINT at random points, then ``--resume``.

Generated scenes (``ntt_core.synthetic``) and tiny random-weight SAM2 / DINOv2 saved in the
``transformers`` layout (``tests/tiny_models.py``), so a run takes seconds; the CLI runs as a real
process, exactly as users start it. First one uninterrupted run gives the expected results; then,
per trial, a run is started, killed (SIGKILL) or interrupted (SIGINT) at a random moment (after a
random number of finished images, during segmentation or while writing the results), and resumed with
``--resume`` until it finishes. Per trial the final results are compared image by image with the
uninterrupted run's: an image is *lost* when it has no results, *duplicated* when its results
appear more than once, *half-written* when they differ otherwise (or a file is not valid JSON);
and the whole file is compared byte for byte (the order of the results included).
Goal: 0 / 0 / 0, and every file identical.

    python benchmarks/kill_predict.py --json
    python benchmarks/kill_predict.py --trials 3 --images 8 --json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script from a checkout that is not installed
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # tiny_models: the tests' random-weight models

from ntt_core.journal import journal_path  # noqa: E402

SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGINT": signal.SIGINT}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10, help="trials per signal")
    parser.add_argument("--images", type=int, default=20, help="target images")
    parser.add_argument("--points-per-side", type=int, default=8, help="prompt grid side (tiny: fast)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return parser.parse_args(argv)


def prepare(folder: Path, count: int) -> tuple[list[str], list[str]]:
    """Scenes, tiny models and a memory bank under ``folder``; returns (models options, predict argv)."""
    from tiny_models import save_tiny_models

    from ntt_core.cli import main
    from ntt_core.synthetic import CLASSES, IMAGES_DIR, make_dataset, write_coco_folder

    sam2, dinov2 = save_tiny_models(folder / "models")
    models = ["--sam2", str(sam2), "--dinov2", str(dinov2), "--device", "cpu"]
    references = write_coco_folder(make_dataset(2, seed=1, size=(96, 128), classes=CLASSES), folder / "references")
    targets = write_coco_folder(make_dataset(count, seed=2, size=(96, 128), classes=CLASSES), folder / "targets")
    bank = folder / "bank"
    build = ["build-memory", "--references", str(references), "--images", str(folder / "references" / IMAGES_DIR)]
    assert main([*build, "--out", str(bank), *models]) == 0
    predict = ["predict", "--memory", str(bank), "--images", str(folder / "targets" / IMAGES_DIR)]
    return models, [*predict, "--targets", str(targets), *models]


def ntt(argv: list[str]) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(
        [sys.executable, "-m", "ntt_core.cli", *argv],
        cwd=REPO,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def by_image(path: Path) -> dict | None:
    """Results of a results file grouped by image id (None when the file is not valid JSON)."""
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    grouped = defaultdict(list)
    for result in results:
        grouped[result["image_id"]].append(json.dumps(result, sort_keys=True))
    return dict(grouped)


def compare(expected: dict, found: dict | None, image_ids: list) -> dict[str, int]:
    """Lost, duplicated and half-written images of ``found`` against ``expected``."""
    if found is None:
        return {"lost": 0, "duplicated": 0, "half_written": len(image_ids)}
    counts = {"lost": 0, "duplicated": 0, "half_written": 0}
    for image_id in image_ids:
        want, got = expected.get(image_id, []), found.get(image_id, [])
        if got == want:
            continue
        if want and not got:
            counts["lost"] += 1
        elif want and len(got) > len(want) and all(got.count(r) >= want.count(r) for r in want):
            counts["duplicated"] += 1
        else:
            counts["half_written"] += 1
    return counts


def finished(journal: Path) -> int:
    """Images recorded in ``journal`` so far (complete lines after the header)."""
    try:
        return max(journal.read_bytes().count(b"\n") - 1, 0)
    except FileNotFoundError:
        return 0


def trial(predict: list[str], out: Path, kind: str, images: int, image_seconds: float, rng: random.Random) -> dict:
    """One kill (or interrupt) and the resumes it takes to finish; returns what happened. The moment:
    a random number of finished images (all of them: while the results are written), then a random
    part of one image's time, so it does not depend on how loaded the machine is."""
    journal = journal_path(out)
    target, delay = rng.randint(0, images), rng.uniform(0.0, image_seconds)
    process = ntt([*predict, "--out", str(out)])
    while not (journal.exists() and finished(journal) >= target) and process.poll() is None:
        time.sleep(0.002)
    time.sleep(delay)
    finished_at_kill = None
    if process.poll() is None:
        process.send_signal(SIGNALS[kind])
    code = process.wait()
    stderr = process.stderr.read()
    if journal.exists():
        finished_at_kill = finished(journal)
    resumes = []
    while journal.exists() or not out.exists():
        again = ntt([*predict, "--out", str(out), "--resume"])
        resumes.append(again.wait())
        if resumes[-1] not in (0, 3) or len(resumes) > 3:
            raise RuntimeError(f"resume exited {resumes[-1]}: {again.stderr.read()}")
    left = sorted(p.name for p in out.parent.iterdir() if p.name != out.name and not p.name.endswith("_targets.json"))
    return {
        "signal": kind,
        "after_images": target,
        "then_s": round(delay, 3),
        "exit": code,
        "traceback": "Traceback" in stderr,
        "last_line": stderr.strip().splitlines()[-1] if stderr.strip() else "",
        "finished_at_kill": finished_at_kill,  # None: the run had completed
        "resumes": resumes,
        "left_behind": left,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="ntt-kill-") as temporary:
        folder = Path(temporary)
        _, predict = prepare(folder, args.images)
        predict += ["--points-per-side", str(args.points_per_side)]
        reference = folder / "reference" / "r.json"
        reference.parent.mkdir()
        process = ntt([*predict, "--out", str(reference)])
        while not journal_path(reference).exists() and process.poll() is None:
            time.sleep(0.005)
        started = time.perf_counter()
        assert process.wait() == 0, process.stderr.read()
        loop_seconds = time.perf_counter() - started
        expected = by_image(reference)
        image_ids = [
            image["id"] for image in json.loads(Path(predict[predict.index("--targets") + 1]).read_text())["images"]
        ]

        trials, totals = [], {kind: {"lost": 0, "duplicated": 0, "half_written": 0} for kind in SIGNALS}
        for kind in SIGNALS:
            for number in range(args.trials):
                out = folder / f"{kind}_{number}" / "r.json"
                out.parent.mkdir()
                result = trial(predict, out, kind, args.images, loop_seconds / args.images, rng)
                result.update(compare(expected, by_image(out), image_ids))
                result["identical_file"] = out.read_bytes() == reference.read_bytes()  # order included
                for name in totals[kind]:
                    totals[kind][name] += result[name]
                trials.append(result)
                print(json.dumps(result), file=sys.stderr)
    report = {
        "images": args.images,
        "uninterrupted_loop_s": round(loop_seconds, 2),
        "trials_per_signal": args.trials,
        "totals": totals,
        "exit_codes": {kind: sorted({t["exit"] for t in trials if t["signal"] == kind}) for kind in SIGNALS},
        "finished_at_kill": {kind: [t["finished_at_kill"] for t in trials if t["signal"] == kind] for kind in SIGNALS},
        "files_not_identical": sum(not t["identical_file"] for t in trials),
        "sigint_tracebacks": sum(t["traceback"] for t in trials if t["signal"] == "SIGINT"),
        "left_behind": sorted({name for t in trials for name in t["left_behind"]}),
    }
    for kind, total in totals.items():
        print(f"{kind}: lost {total['lost']}, duplicated {total['duplicated']}, half-written {total['half_written']}")
    if args.json:
        print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
