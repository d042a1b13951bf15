"""``ntt demo``: the offline flow end to end through the console script (then re-run with the App
served), the online flow on a local COCO folder with tiny models from disk, and the exits for what
is missing or refused. The test machines can download nothing: the online demo must say so."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import fiftyone as fo
import pytest

from ntt_core.cli import main
from ntt_core.demo import EVAL_KEY, GT_FIELD, PRED_FIELD
from ntt_core.demo.sources import COCO_HOST, OFFLINE_CLASSES, OFFLINE_SCENE_SIZE, reachable
from ntt_core.demo.steps import tag_references
from ntt_core.fiftyone.bank_runs import list_memory_banks, memory_bank_info
from ntt_core.fiftyone.predictions import prediction_record
from ntt_core.synthetic import CLASSES, make_dataset, write_coco_folder

REPO = Path(__file__).resolve().parents[1]
NTT = Path(sys.executable).parent / "ntt"
BANNER = "OFFLINE DEMO: generated scenes and stand-in models, NOT SAM2 and DINOv2."
OFFLINE = "test-demo-offline"


def delete_if_exists(name: str) -> None:
    if fo.dataset_exists(name):
        fo.delete_dataset(name)


def headless_env(**changes) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    return {**env, **changes}


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """``ntt demo --offline --no-app`` with an empty plugins folder (the demo links the plugin)."""
    plugins = tmp_path_factory.mktemp("plugins")
    delete_if_exists(OFFLINE)
    done = subprocess.run(
        [str(NTT), "demo", "--offline", "--no-app", "--dataset", OFFLINE],
        capture_output=True,
        text=True,
        env=headless_env(FIFTYONE_PLUGINS_DIR=str(plugins)),
        timeout=300,
    )
    yield done, plugins
    delete_if_exists(OFFLINE)


def test_offline_demo_runs_the_whole_flow(offline_run):
    done, plugins = offline_run
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(BANNER) == 2  # before anything else, and after the figures
    assert done.stdout.lstrip("#\n ").startswith(BANNER)
    (link,) = plugins.iterdir()
    assert link.resolve() == REPO and f"installed the plugin @ntt/no-time-to-train: {link}" in done.stdout

    scenes = make_dataset(12, seed=0, size=OFFLINE_SCENE_SIZE, classes=CLASSES)
    shown = [scene for scene in scenes if set(scene.class_names) & set(OFFLINE_CLASSES)]
    dataset = fo.load_dataset(OFFLINE)
    assert dataset.persistent and "ntt_demo" in dataset.info
    assert len(dataset) == len(shown)  # images with a demo class; only those classes as ground truth
    expected = {name: sum(s.class_names.count(name) for s in shown) for name in OFFLINE_CLASSES}
    assert dataset.count_values(f"{GT_FIELD}.detections.label") == {k: v for k, v in expected.items() if v}

    references = dataset.select_labels(tags="reference", fields=GT_FIELD)
    assert references.count_values(f"{GT_FIELD}.detections.label") == dict.fromkeys(OFFLINE_CLASSES, 1)
    assert list_memory_banks(dataset) == ["demo"]
    assert memory_bank_info(dataset, "demo")["counts"] == dict.fromkeys(OFFLINE_CLASSES, 1)

    record = prediction_record(dataset, PRED_FIELD)
    assert record["segmenter_id"] == "standin:connected-regions" and record["encoder_id"] == "standin:colour-stats"
    reference_ids = set(references.values("id"))
    assert set(dataset.exists(PRED_FIELD).values("id")) == set(dataset.values("id")) - reference_ids
    predictions = dataset.values(f"{PRED_FIELD}.detections", unwind=True)
    assert predictions and all(d.mask is not None and d.mask.any() for d in predictions)
    assert {d.label for d in predictions} <= set(OFFLINE_CLASSES)

    assert dataset.list_evaluations() == [EVAL_KEY]
    results = dataset.load_evaluation_results(EVAL_KEY)
    assert results.mAP() > 0.8  # the stand-ins find the generated shapes; see test_pipeline_correctness
    assert f"FiftyOne COCO mAP (masks): {100 * results.mAP():.1f}" in done.stdout
    segm_ap = results.custom_metrics["pycocotools_segm_AP"]["value"]
    assert 0.8 < segm_ap <= 1.0 and f"segm  {100 * segm_ap:7.1f}" in done.stdout


def test_rerun_replaces_the_demo_dataset_and_serves_the_app(offline_run):
    assert offline_run[0].returncode == 0
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [str(NTT), "demo", "--offline", "--dataset", OFFLINE, "--max-samples", "4", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=headless_env(),
    )
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    seen, deadline = [], time.monotonic() + 240
    try:
        while not (seen and seen[-1].startswith("App: ")):
            seen.append(lines.get(timeout=max(deadline - time.monotonic(), 0.1)))
        assert f"dataset '{OFFLINE}': replaces the one an earlier demo run made\n" in seen
        url = seen[-1].split()[1]
        assert url == f"http://localhost:{port}/" and "no display here" in seen[-1]
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=30) as page:
            assert page.status == 200
    finally:
        process.send_signal(signal.SIGINT)  # what Ctrl+C sends
        code = process.wait(timeout=60)
    assert code == 0, "".join(seen)
    dataset = fo.load_dataset(OFFLINE)
    assert len(dataset) <= 4 and dataset.list_evaluations() == [EVAL_KEY]


@pytest.fixture
def coco_dir(tmp_path) -> Path:
    write_coco_folder(make_dataset(5, seed=1, size=(96, 128)), tmp_path / "coco")
    return tmp_path / "coco"


def test_online_flow_on_a_local_coco_folder_with_local_models(coco_dir, tiny_models, capsys):
    name = "test-demo-coco"
    delete_if_exists(name)
    sam2, dinov2 = (str(path) for path in tiny_models)
    args = ["--coco-dir", coco_dir, "--sam2", sam2, "--dinov2", dinov2, "--device", "cpu", "--points-per-side", "2"]
    try:
        code = main(
            ["demo", "--no-app", "--dataset", name, "--classes", "disc,square", "--shots", "1", *map(str, args)]
        )
        out = capsys.readouterr().out
        assert code == 0 and BANNER not in out
        dataset = fo.load_dataset(name)
        assert set(dataset.distinct(f"{GT_FIELD}.detections.label")) == {"disc", "square"}
        assert memory_bank_info(dataset, "demo")["encoder_id"] == dinov2
        record = prediction_record(dataset, PRED_FIELD)
        assert record["segmenter_id"] == sam2 and record["settings"]["points_per_side"] == 2
        assert len(dataset.exists(PRED_FIELD)) == len(dataset) - len(record["reference_sample_ids"]) > 0
        assert dataset.list_evaluations() == [EVAL_KEY] and "FiftyOne COCO mAP (masks)" in out
    finally:
        delete_if_exists(name)


@pytest.mark.bad_input
def test_online_demo_without_network_names_what_is_missing():
    name = "test-demo-online"
    done = subprocess.run(
        [str(NTT), "demo", "--no-app", "--dataset", name], capture_output=True, text=True, env=os.environ, timeout=120
    )
    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("ntt: error: the demo cannot get what it needs: ")
    for weights, option in (
        ("SAM2 weights facebook/sam2-hiera-large/sam2_hiera_large.pt", "--sam2 / sam2="),
        ("DINOv2 weights facebook/dinov2-large/config.json", "--dinov2 / dinov2="),
    ):
        assert f"{weights} are not in the Hugging Face cache and HF_HUB_OFFLINE is set; download it with" in line
        assert f"or point {option} at a local copy" in line
    if not reachable(COCO_HOST):
        assert "COCO-2017 validation (FiftyOne zoo): not downloaded" in line and "--coco-dir DIR" in line
    assert line.endswith("(`ntt demo --offline` runs the flow on generated scenes with stand-in models)")
    assert not fo.dataset_exists(name)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "options, message",
    [
        (["--offline", "--sam2", "x"], "--offline uses generated scenes and stand-in models: it takes no --coco-dir"),
        (
            ["--coco-dir", "{empty}"],
            "--coco-dir {empty}: no labels json (labels.json / annotations.json / annotations/instances_val2017.json) "
            "and no images folder (data / images / val2017) in it",
        ),
        (["--coco-dir", "{empty}/none"], "--coco-dir {empty}/none: no such folder"),
        (
            ["--coco-dir", "{coco}", "--sam2", "{empty}/sam2", "--dinov2", "{empty}"],
            "the demo cannot get what it needs: SAM2 model '{empty}/sam2' could not be loaded: no such file or folder",
        ),
    ],
)
def test_bad_options_exit_2_with_one_line(options, message, coco_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    paths = dict(empty=tmp_path / "empty", coco=coco_dir)
    code = main(["demo", "--no-app", *(option.format(**paths) for option in options)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("ntt: error: " + message.format(**paths)) and err.count("\n") == 1


@pytest.mark.bad_input
def test_a_dataset_the_demo_did_not_make_is_never_replaced(capsys):
    dataset = fo.Dataset("test-demo-foreign")
    dataset.add_sample(fo.Sample(filepath="/nowhere.png"))
    try:
        code = main(["demo", "--offline", "--no-app", "--dataset", dataset.name])
        assert code == 2 and capsys.readouterr().err == (
            "ntt: error: dataset 'test-demo-foreign' exists and was not made by `ntt demo`: "
            "choose another --dataset name\n"
        )
        assert len(fo.load_dataset("test-demo-foreign")) == 1
    finally:
        dataset.delete()


def test_references_follow_the_papers_rule_first_from_distinct_images(capsys):
    """Valid instances (box >= 32 px, 10 px from the borders) before small ones, never a crowd
    one, never two from one sample; fewer than K is a warning."""

    def sample(*labels):
        detections = [
            fo.Detection(label=n, bounding_box=[x / 200, 20 / 200, w / 200, w / 200], iscrowd=c)
            for n, x, w, c in labels
        ]
        return fo.Sample(
            filepath="/nowhere.png",
            metadata=fo.ImageMetadata(width=200, height=200),
            ground_truth=fo.Detections(detections=detections),
        )

    dataset = fo.Dataset()
    try:
        dataset.add_samples(
            [
                sample(("a", 20, 20, 0)),  # too small
                sample(("a", 20, 60, 0), ("b", 100, 40, 0), ("b", 20, 40, 0)),  # valid a; two valid b
                sample(("a", 20, 80, 1)),  # crowd
                sample(("a", 0, 60, 0)),  # touches the border
            ]
        )
        valid_a = dataset.skip(1).first().ground_truth.detections[0].id
        for seed in range(5):
            dataset.untag_labels("reference")
            chosen = tag_references(dataset, ["a", "b"], 1, seed)
            assert [label for _, label in chosen["a"]] == [valid_a]
        dataset.untag_labels("reference")
        chosen = tag_references(dataset, ["a", "b"], 4, 0)
        assert len(chosen["a"]) == 3 and len({s for s, _ in chosen["a"]}) == 3  # the crowd one never
        assert chosen["a"][0][1] == valid_a and len(chosen["b"]) == 1  # both b in one sample
        assert dataset.count_label_tags() == {"reference": 4}
        err = capsys.readouterr().err
        assert "class 'a': 3 reference(s) from distinct images, 4 asked" in err
        assert "class 'b': 1 reference(s) from distinct images, 4 asked" in err
    finally:
        dataset.delete()
