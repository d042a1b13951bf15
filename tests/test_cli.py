"""The ``ntt`` CLI end to end on a tiny COCO folder with tiny random models, and its bad-input exits."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from coco_folder import SIZE
from pycocotools import mask as mask_utils

from ntt_core.cli import EXIT_SOME_SKIPPED, main
from ntt_core.memory_bank import MemoryBank

REPO = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--points-per-side", "2"]


def models(tiny_models) -> list[str]:
    sam2, dinov2 = tiny_models
    return ["--sam2", str(sam2), "--dinov2", str(dinov2)]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_in_a_real_process():
    done = subprocess.run(
        [sys.executable, "-m", "ntt_core.cli", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    for command in ("sample-references", "build-memory", "predict", "evaluate"):
        assert command in done.stdout


@pytest.mark.parametrize(
    "command, option",
    [
        ("sample-references", "--seed-scope"),
        ("build-memory", "--context-ratio"),
        ("predict", "--points-per-side"),
        ("evaluate", "--classes"),
    ],
)
def test_each_command_has_help(capsys, command, option):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0 and option in capsys.readouterr().out


def test_workflow_end_to_end(folder, tiny_models, tmp_path, capsys):
    annotations, images = folder / "annotations.json", folder / "images"
    coco = json.loads(annotations.read_text())

    code, out, _ = run(
        capsys,
        "sample-references",
        "--annotations",
        annotations,
        "--shots",
        2,
        "--seed",
        0,
        "--classes",
        "all",
        "--out",
        tmp_path / "refs.json",
    )
    assert code == 0 and "wrote 4 references of 2 classes" in out
    refs = json.loads((tmp_path / "refs.json").read_text())
    for category_id in (1, 2):
        chosen = [a for a in refs["annotations"] if a["category_id"] == category_id]
        assert len(chosen) == 2 and len({a["image_id"] for a in chosen}) == 2
    assert 300 not in {a["id"] for a in refs["annotations"]}  # the crowd one

    code, out, err = run(
        capsys,
        "build-memory",
        "--references",
        tmp_path / "refs.json",
        "--images",
        images,
        "--out",
        tmp_path / "bank",
        *models(tiny_models),
        "--device",
        "cpu",
    )
    assert code == 0 and "wrote a memory bank of 4 references (red: 2, blue: 2)" in out
    assert "on CPU, about" in err
    bank = MemoryBank.load(tmp_path / "bank")
    assert bank.classes == ["red", "blue"]
    assert sorted(bank.reference_ids) == sorted(str(a["id"]) for a in refs["annotations"])

    code, out, err = run(
        capsys,
        "predict",
        "--memory",
        tmp_path / "bank",
        "--images",
        images,
        "--targets",
        annotations,
        "--out",
        tmp_path / "results.json",
        *models(tiny_models),
        *TINY,
        "--batch-size",
        2,
    )
    assert code == 0 and "for 4 images" in out and "on CPU, about" in err
    results = json.loads((tmp_path / "results.json").read_text())
    assert results, "the tiny pipeline found nothing at all"
    image_ids = {image["id"] for image in coco["images"]}
    for result in results:
        assert result["image_id"] in image_ids and result["category_id"] in (1, 2)
        assert result["segmentation"]["size"] == [SIZE, SIZE] and 0.0 <= result["score"] <= 1.0
        x, y, w, h = result["bbox"]
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= SIZE and y + h <= SIZE
    assert len({r["image_id"] for r in results}) <= 4

    code, out, _ = run(
        capsys,
        "evaluate",
        "--targets",
        annotations,
        "--results",
        tmp_path / "results.json",
        "--out",
        tmp_path / "metrics.json",
    )
    assert code == 0
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith(("bbox", "segm"))}
    assert set(rows) == {"bbox"} and len(rows["bbox"]) == 7
    assert "note: segm skipped: some ground-truth annotations have no segmentation" in out  # the box-only blue
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert rows["bbox"][0] == f"{100 * metrics['bbox']['AP']:.1f}"

    # Without targets: ids follow the sorted file names and the bank's classes, written beside the results.
    code, out, _ = run(
        capsys,
        "predict",
        "--memory",
        tmp_path / "bank",
        "--images",
        images,
        "--out",
        tmp_path / "bare.json",
        *models(tiny_models),
        *TINY,
    )
    assert code == 0 and "bare_targets.json" in out
    targets = json.loads((tmp_path / "bare_targets.json").read_text())
    assert [(i["id"], i["file_name"], i["height"], i["width"]) for i in targets["images"]] == [
        (n + 1, f"img{n}.png", SIZE, SIZE) for n in range(4)
    ]
    assert targets["categories"] == [{"id": 1, "name": "red"}, {"id": 2, "name": "blue"}]
    bare = json.loads((tmp_path / "bare.json").read_text())
    assert {r["image_id"] for r in bare} <= {1, 2, 3, 4} and {r["category_id"] for r in bare} <= {1, 2}
    # Same models, same images, same bank: the same detections under the new ids.
    renumber = {10 + n: n + 1 for n in range(4)}
    assert sorted((renumber[r["image_id"]], r["category_id"], r["bbox"]) for r in results) == sorted(
        (r["image_id"], r["category_id"], r["bbox"]) for r in bare
    )


def test_box_only_references_go_through_sam2(folder, tiny_models, tmp_path, capsys):
    # --shots 1 keeps the first of each class in the file: red 100 (polygon) and blue 200 (box only).
    code, out, _ = run(
        capsys,
        "build-memory",
        "--references",
        folder / "annotations.json",
        "--images",
        folder / "images",
        "--out",
        tmp_path / "bank",
        "--shots",
        1,
        *models(tiny_models),
        "--device",
        "cpu",
    )
    assert code == 0
    bank = MemoryBank.load(tmp_path / "bank")
    assert bank.reference_ids == ["100", "200"] and bank.segmenter_id == str(tiny_models[0])


def test_evaluate_a_perfect_results_file(folder, tmp_path, capsys):
    coco = json.loads((folder / "annotations.json").read_text())
    results = []
    for a in coco["annotations"]:
        if a.get("iscrowd"):
            continue
        x, y, w, h = a["bbox"]
        mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
        mask[y : y + h, x : x + w] = 1
        rle = mask_utils.encode(np.asfortranarray(mask))
        segmentation = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        results.append(
            {
                "image_id": a["image_id"],
                "category_id": a["category_id"],
                "bbox": a["bbox"],
                "score": 1.0,
                "segmentation": segmentation,
            }
        )
    (tmp_path / "perfect.json").write_text(json.dumps(results))
    code, out, _ = run(
        capsys,
        "evaluate",
        "--targets",
        folder / "annotations.json",
        "--results",
        tmp_path / "perfect.json",
        "--classes",
        "red",
    )
    assert code == 0 and out.splitlines()[0] == "classes (1): red"
    rows = [line.split() for line in out.splitlines() if line.startswith(("bbox", "segm"))]
    assert [row[0] for row in rows] == ["bbox", "segm"], out
    for row in rows:  # 36-px squares: medium objects only
        assert row[1:] == ["100.0", "100.0", "100.0", "-", "100.0", "-", "100.0"]


def error_line(err: str) -> str:
    """The one ``ntt: error:`` line, checked to be the last line and the only one."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert [line for line in lines if line.startswith("ntt: error:")] == [lines[-1]]
    return lines[-1]


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "content, message",
    [
        (None, "annotations.json: file not found"),
        ('{"images": [', "annotations.json: not valid json"),
        ('{"images": [], "categories": []}', "annotations.json: missing key(s) annotations"),
    ],
)
def test_sample_references_bad_files(tmp_path, capsys, content, message):
    path = tmp_path / "annotations.json"
    if content is not None:
        path.write_text(content)
    code, _, err = run(
        capsys, "sample-references", "--annotations", path, "--shots", 1, "--seed", 0, "--out", tmp_path / "refs.json"
    )
    assert code == 2 and message in error_line(err)
    assert not (tmp_path / "refs.json").exists()


def test_short_class_warns(folder, tmp_path, capsys):
    code, out, err = run(
        capsys,
        "sample-references",
        "--annotations",
        folder / "annotations.json",
        "--shots",
        5,
        "--seed",
        0,
        "--classes",
        "all",
        "--out",
        tmp_path / "refs.json",
    )
    assert code == 0 and "wrote 8 references of 2 classes from 4 images" in out
    assert "ntt: warning: class 'red': only 4 valid instance(s) in distinct images, 5 asked" in err


@pytest.mark.bad_input
def test_unknown_class(folder, tmp_path, capsys):
    code, _, err = run(
        capsys,
        "sample-references",
        "--annotations",
        folder / "annotations.json",
        "--shots",
        1,
        "--seed",
        0,
        "--classes",
        "red,zebra",
        "--out",
        tmp_path / "r.json",
    )
    assert code == 2 and "unknown class(es) 'zebra'" in error_line(err)
    code, _, err = run(
        capsys,
        "sample-references",
        "--annotations",
        folder / "annotations.json",
        "--shots",
        1,
        "--seed",
        0,
        "--out",
        tmp_path / "r.json",
    )
    assert code == 2 and "unknown class(es) 'person'" in error_line(err)  # few-shot classes by default
    code, _, err = run(
        capsys,
        "evaluate",
        "--targets",
        folder / "annotations.json",
        "--results",
        tmp_path / "r.json",
        "--classes",
        "zebra",
    )
    assert code == 2 and "unknown class(es) 'zebra'" in error_line(err)


@pytest.mark.bad_input
def test_argument_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["sample-references", "--annotations", "a.json", "--shots", "0", "--seed", "1", "--out", "r.json"])
    assert exit_.value.code == 2 and "argument --shots: shots must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.bad_input
def test_missing_reference_image(folder, tiny_models, tmp_path, capsys):
    code, _, err = run(
        capsys,
        "build-memory",
        "--references",
        folder / "annotations.json",
        "--images",
        tmp_path,
        "--out",
        tmp_path / "bank",
        *models(tiny_models),
        "--device",
        "cpu",
    )
    assert code == 2 and "img0.png: image file not found" in error_line(err)
    assert not (tmp_path / "bank").exists()


@pytest.mark.bad_input
def test_a_checkpoint_that_does_not_fill_the_model_is_one_line(folder, tiny_models, tmp_path, capsys):
    from tiny_models import renamed_layer, tampered

    broken = tampered(tiny_models[1], tmp_path / "dinov2", renamed_layer)
    argv = ["build-memory", "--references", folder / "annotations.json", "--images", folder / "images"]
    code, _, err = run(capsys, *argv, "--out", tmp_path / "bank", "--dinov2", broken, "--device", "cpu")
    line = error_line(err)
    assert code == 2 and line.startswith(f"ntt: error: {broken} does not fit Dinov2Model: tensors ")
    assert re.search(r"tensors (\d+) missing \(encoder\.layer\.1\..*; \1 with no place in the model", line)
    assert not (tmp_path / "bank").exists()


@pytest.mark.bad_input
def test_missing_model(folder, tmp_path, capsys):
    empty = tmp_path / "no_model"
    empty.mkdir()
    code, _, err = run(
        capsys,
        "build-memory",
        "--references",
        folder / "annotations.json",
        "--images",
        folder / "images",
        "--out",
        tmp_path / "bank",
        "--dinov2",
        empty,
        "--device",
        "cpu",
    )
    assert code == 2 and f"DINOv2 model '{empty}' could not be loaded from a local directory" in error_line(err)


@pytest.mark.bad_input
def build_one_shot_bank(folder: Path, tiny_models, out: Path) -> None:
    """``ntt build-memory`` with one reference per class of the test folder, into ``out``."""
    argv = ["build-memory", "--references", str(folder / "annotations.json"), "--images", str(folder / "images")]
    assert main([*argv, "--out", str(out), "--shots", "1", *models(tiny_models), "--device", "cpu"]) == 0


def test_predict_bad_inputs(folder, tiny_models, tmp_path, capsys):
    code, _, err = run(
        capsys,
        "predict",
        "--memory",
        tmp_path / "nobank",
        "--images",
        folder / "images",
        "--out",
        tmp_path / "r.json",
        *models(tiny_models),
        *TINY,
    )
    assert code == 2 and "not a memory bank" in error_line(err)

    build_one_shot_bank(folder, tiny_models, tmp_path / "bank")
    other = json.loads((folder / "annotations.json").read_text())
    other["categories"][1]["name"] = "green"
    (tmp_path / "other.json").write_text(json.dumps(other))
    capsys.readouterr()
    code, _, err = run(
        capsys,
        "predict",
        "--memory",
        tmp_path / "bank",
        "--images",
        folder / "images",
        "--targets",
        tmp_path / "other.json",
        "--out",
        tmp_path / "r.json",
        *models(tiny_models),
        *TINY,
    )
    assert code == 2 and "other.json: no category for the bank's class(es) 'blue'" in error_line(err)

    code, _, err = run(
        capsys,
        "predict",
        "--memory",
        tmp_path / "bank",
        "--images",
        tmp_path / "noimages",
        "--out",
        tmp_path / "r.json",
        *models(tiny_models),
        *TINY,
    )
    assert code == 2 and "noimages: image folder not found" in error_line(err)


def test_unreadable_target_image_is_skipped_not_fatal(folder, tiny_models, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes((folder / "images" / "img1.png").read_bytes())
    (images / "b.png").write_bytes(b"not a png")
    build_one_shot_bank(folder, tiny_models, tmp_path / "bank")
    code, out, err = run(
        capsys,
        "predict",
        "--memory",
        tmp_path / "bank",
        "--images",
        images,
        "--out",
        tmp_path / "r.json",
        *models(tiny_models),
        *TINY,
    )
    assert code == EXIT_SOME_SKIPPED == 3 and "for 1 images" in out
    assert "ntt: warning: 1 of 2 images skipped: " in err and "b.png: unreadable or corrupt image" in err
    targets = json.loads((tmp_path / "r_targets.json").read_text())
    assert [(i["id"], i["file_name"]) for i in targets["images"]] == [(1, "a.png")]


@pytest.mark.bad_input
def test_evaluate_results_for_unknown_images(folder, tmp_path, capsys):
    (tmp_path / "r.json").write_text(
        json.dumps([{"image_id": 99, "category_id": 1, "bbox": [1, 1, 5, 5], "score": 0.5}])
    )
    code, _, err = run(capsys, "evaluate", "--targets", folder / "annotations.json", "--results", tmp_path / "r.json")
    assert code == 2 and "result #0 is for image id 99, which is not in the ground truth" in error_line(err)


def test_predict_reuses_the_candidate_cache_and_can_go_without(folder, tiny_models, tmp_path, capsys, monkeypatch):
    build_one_shot_bank(folder, tiny_models, tmp_path / "bank")
    monkeypatch.setenv("NTT_CACHE_DIR", str(tmp_path / "default"))
    predict = ["predict", "--memory", tmp_path / "bank", "--images", folder / "images", *models(tiny_models), *TINY]
    cache = tmp_path / "cache"
    assert run(capsys, *predict, "--out", tmp_path / "first.json", "--cache", cache)[0] == 0
    entries = {path.name: path.stat().st_ino for path in cache.iterdir()}  # a rewrite renames a new file
    assert len(entries) == len(list((folder / "images").iterdir()))
    assert run(capsys, *predict, "--out", tmp_path / "again.json", "--cache", cache)[0] == 0
    assert {path.name: path.stat().st_ino for path in cache.iterdir()} == entries  # all served from the cache
    assert run(capsys, *predict, "--out", tmp_path / "uncached.json", "--no-cache")[0] == 0
    first, again, uncached = (
        json.loads((tmp_path / f"{name}.json").read_text()) for name in ("first", "again", "uncached")
    )
    assert first == again == uncached
    assert not (tmp_path / "default").exists()  # --no-cache wrote nothing in the default folder either


@pytest.mark.bad_input
@pytest.mark.parametrize("limit", ["0", "-1", "nan"])
def test_predict_refuses_a_cache_limit_below_zero(folder, tiny_models, tmp_path, capsys, limit):
    argv = ["predict", "--memory", tmp_path, "--images", folder / "images", "--out", tmp_path / "r.json"]
    with pytest.raises(SystemExit) as exit_:
        run(capsys, *argv, "--cache-limit", limit)
    assert exit_.value.code == 2 and f"{limit} is not a number > 0" in capsys.readouterr().err


@pytest.mark.bad_input
def test_predict_refuses_a_cache_folder_that_is_a_file(folder, tiny_models, tmp_path, capsys):
    build_one_shot_bank(folder, tiny_models, tmp_path / "bank")
    (tmp_path / "file").write_text("")
    argv = ["predict", "--memory", tmp_path / "bank", "--images", folder / "images", "--out", tmp_path / "r.json"]
    code, _, err = run(capsys, *argv, *models(tiny_models), *TINY, "--cache", tmp_path / "file")
    assert code == 2 and "is a file, not a folder" in error_line(err)
