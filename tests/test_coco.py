"""COCO json in/out, reference sampling and evaluation, on tiny hand-made COCO dicts."""

from __future__ import annotations

import copy
import json
import logging
import random

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from ntt_core.coco import (
    FEW_SHOT_CLASSES,
    CocoFormatError,
    ResultsWriter,
    annotation_mask,
    encode_mask,
    instances_to_coco_results,
    is_valid_reference,
    list_images,
    load_coco,
    make_targets,
    references_from_coco,
    sample_references,
)
from ntt_core.coco_evaluation import evaluate
from ntt_core.instances import Instances


def square(x: int, y: int, side: int) -> list[list[int]]:
    return [[x, y, x + side, y, x + side, y + side, x, y + side]]


def square_mask(x: int, y: int, w: int, h: int, size=(100, 100)) -> np.ndarray:
    mask = np.zeros(size, dtype=bool)
    mask[y : y + h, x : x + w] = True
    return mask


def small_coco() -> dict:
    return {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 100, "height": 100},
            {"id": 2, "file_name": "sub/b.jpg", "width": 100, "height": 80},
        ],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
        "annotations": [
            {"id": 11, "image_id": 1, "category_id": 3, "bbox": [10, 10, 40, 40], "segmentation": square(10, 10, 40)},
            {"id": 12, "image_id": 1, "category_id": 7, "bbox": [55, 50, 30, 20]},  # box only
            {
                "id": 13,
                "image_id": 2,
                "category_id": 3,
                "bbox": [0, 0, 5, 5],
                "segmentation": square(0, 0, 5),
                "iscrowd": 1,
            },
            {"id": 14, "image_id": 2, "category_id": 7, "bbox": [20, 20, 10, 10], "segmentation": square(20, 20, 10)},
        ],
    }


# --- validation ---


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.pop("categories"), "missing key(s) categories"),
        (lambda d: d["annotations"][0].update(image_id=99), "annotation 11 points at unknown image id 99"),
        (lambda d: d["annotations"][0].update(category_id=5), "annotation 11 points at unknown category id 5"),
        (lambda d: d["annotations"][1].update(bbox=[1, 2, -3, 4]), "annotation 12 has bad bbox [1, 2, -3, 4]"),
        (lambda d: d["annotations"][1].update(bbox=[1, 2, 3]), "annotation 12 has bad bbox [1, 2, 3]"),
        (lambda d: d["annotations"][1].update(bbox=[1, 2, float("nan"), 4]), "annotation 12 has bad bbox"),
        (lambda d: d["images"][1].update(id=1), "duplicate image id(s) 1"),
        (lambda d: d["annotations"][1].update(id=11), "duplicate annotation id(s) 11"),
        (lambda d: d["categories"][1].update(name="cat"), "duplicate category name(s) 'cat'"),
        (lambda d: d["images"][0].pop("height"), "image #0 (id 1) lacks height"),
        (lambda d: d["images"][0].update(width=0), "image 1 has width/height 0/100"),
        (lambda d: d.update(annotations={}), "'annotations' must be a list of objects"),
    ],
)
def test_load_coco_rejects_malformed_files_naming_file_and_problem(tmp_path, edit, message):
    data = small_coco()
    edit(data)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CocoFormatError) as error:
        load_coco(path)
    assert str(path) in str(error.value) and message in str(error.value)


@pytest.mark.bad_input
def test_load_coco_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CocoFormatError, match="nothere.json: file not found"):
        load_coco(tmp_path / "nothere.json")
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"images": [')
    with pytest.raises(CocoFormatError, match="corrupt.json: not valid json"):
        load_coco(corrupt)
    listing = tmp_path / "list.json"
    listing.write_text("[]")
    with pytest.raises(CocoFormatError, match="must be an object"):
        load_coco(listing)


def test_targets_may_lack_annotations():
    data = small_coco()
    del data["annotations"]
    with pytest.raises(CocoFormatError, match="missing key"):
        load_coco(copy.deepcopy(data))
    assert load_coco(data, require_annotations=False)["annotations"] == []


# --- masks and references ---


def test_polygon_mask_covers_the_square():
    mask = annotation_mask({"segmentation": square(10, 20, 30)}, 60, 50)
    assert mask.shape == (60, 50) and mask.dtype == bool
    assert np.array_equal(mask, square_mask(10, 20, 30, 30, (60, 50)))


def test_uncompressed_and_compressed_rle_decode_at_image_size():
    # Column-major runs on a 4 x 3 image: 5 off, 2 on, 5 off -> pixels (row 1, col 1) and (row 2, col 1).
    mask = annotation_mask({"segmentation": {"size": [4, 3], "counts": [5, 2, 5]}}, 4, 3)
    expected = np.zeros((4, 3), dtype=bool)
    expected[1:3, 1] = True
    assert np.array_equal(mask, expected)
    compressed = mask_utils.encode(np.asfortranarray(expected.astype(np.uint8)))
    compressed["counts"] = compressed["counts"].decode("ascii")  # as stored in json
    assert np.array_equal(annotation_mask({"segmentation": compressed}, 4, 3), expected)


@pytest.mark.bad_input
def test_bad_segmentations_are_named():
    with pytest.raises(CocoFormatError, match=r"annotation 5: RLE size \[4, 3\] differs from the image size \[3, 4\]"):
        annotation_mask({"id": 5, "segmentation": {"size": [4, 3], "counts": [12]}}, 3, 4)
    with pytest.raises(CocoFormatError, match="annotation 6: polygons must be"):
        annotation_mask({"id": 6, "segmentation": [[1, 2, 3]]}, 3, 4)
    with pytest.raises(CocoFormatError, match="annotation 7: segmentation is neither"):
        annotation_mask({"id": 7, "segmentation": "abc"}, 3, 4)


def test_box_only_annotations_have_no_mask():
    assert annotation_mask({"bbox": [1, 2, 3, 4]}, 10, 10) is None
    assert annotation_mask({"bbox": [1, 2, 3, 4], "segmentation": []}, 10, 10) is None


def test_references_from_coco(tmp_path):
    references = references_from_coco(small_coco(), tmp_path)
    assert [r.image_id for r in references] == ["1", "2"]
    assert references[0].image == str(tmp_path / "a.jpg") and references[1].image == str(tmp_path / "sub/b.jpg")
    cat, dog = references[0].instances
    # Every instance keeps its annotation bbox (x0, y0, x1, y1): the authors' reference crop follows it.
    assert (cat.class_name, cat.reference_id, cat.box) == ("cat", "11", (10, 10, 50, 50))
    assert np.array_equal(cat.mask, square_mask(10, 10, 40, 40))
    assert (dog.class_name, dog.reference_id, dog.mask) == ("dog", "12", None)
    assert list(dog.box) == [55, 50, 85, 70]  # xyxy
    # The crowd cat (13) of image 2 is skipped; its dog keeps a mask at image 2's size (80 x 100).
    [dog2] = references[1].instances
    assert dog2.reference_id == "14" and dog2.mask.shape == (80, 100)


def test_references_by_class_name_and_per_class_limit(tmp_path):
    dogs = references_from_coco(small_coco(), tmp_path, classes=["dog"])
    assert [i.reference_id for r in dogs for i in r.instances] == ["12", "14"]
    first_dog = references_from_coco(small_coco(), tmp_path, max_per_class=1)
    assert [i.reference_id for r in first_dog for i in r.instances] == ["11", "12"]
    with pytest.raises(CocoFormatError, match="unknown class.*'horse'"):
        references_from_coco(small_coco(), tmp_path, classes=["dog", "horse"])


# --- few-shot sampling ---


@pytest.mark.parametrize(
    "box, iscrowd, valid",
    [
        ([10, 10, 32, 32], 0, True),  # exactly at every limit
        ([10, 10, 31.9, 40], 0, False),  # too narrow
        ([10, 10, 40, 31], 0, False),  # too short
        ([9.5, 10, 40, 40], 0, False),  # too close to the left border
        ([10, 9, 40, 40], 0, False),  # too close to the top
        ([50, 10, 40, 40], 0, True),  # right edge at 90: 10 px from the border of a 100 px image
        ([50.5, 10, 40, 40], 0, False),  # 9.5 px from the right border
        ([10, 31, 40, 40], 0, False),  # bottom edge at 71: 9 px from the border of an 80 px image
        ([10, 10, 40, 40], 1, False),  # crowd
    ],
)
def test_reference_validity_rules(box, iscrowd, valid):
    image = {"id": 1, "width": 100, "height": 80}
    assert is_valid_reference({"bbox": box, "iscrowd": iscrowd}, image) is valid


def sampling_coco(classes=("cat", "dog"), per_class=6) -> dict:
    """Every annotation valid and alone in its image, so a sample is the shuffle's first K."""
    images, annotations = [], []
    for c, _ in enumerate(classes):
        for i in range(per_class):
            image_id = 100 * (c + 1) + i
            images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": 100, "height": 100})
            annotations.append(
                {"id": 1000 + image_id, "image_id": image_id, "category_id": c + 1, "bbox": [20, 20, 40, 40]}
            )
    categories = [{"id": c + 1, "name": name} for c, name in enumerate(classes)]
    return {"images": images, "categories": categories, "annotations": annotations}


def sampled_ids(coco: dict, category_id: int) -> list[int]:
    return [a["id"] for a in coco["annotations"] if a["category_id"] == category_id]


def test_sampling_keeps_valid_instances_from_distinct_images():
    coco = {
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 100} for i in (1, 2, 3, 4)],
        "categories": [{"id": 1, "name": "cat"}],
        "annotations": [
            {"id": 11, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40]},
            {"id": 12, "image_id": 1, "category_id": 1, "bbox": [50, 50, 40, 40]},
            {"id": 21, "image_id": 2, "category_id": 1, "bbox": [20, 20, 50, 50]},
            {"id": 31, "image_id": 3, "category_id": 1, "bbox": [20, 20, 20, 50]},  # too narrow
            {"id": 41, "image_id": 4, "category_id": 1, "bbox": [20, 20, 50, 50], "iscrowd": 1},
        ],
    }
    for seed in range(10):
        sampled = sample_references(coco, shots=2, seed=seed, classes="all")
        ids = sorted(a["id"] for a in sampled["annotations"])
        # Whatever the shuffle: image 2's instance, one of image 1's, never 31 nor 41.
        assert ids in ([11, 21], [12, 21]), (seed, ids)
        assert [image["id"] for image in sampled["images"]] == [1, 2]
        assert sampled["info"]["ntt_sampling"]["warnings"] == []


def test_short_class_keeps_what_it_has_and_warns(caplog):
    coco = sampling_coco(per_class=3)
    coco["annotations"][0]["bbox"] = [0, 0, 40, 40]  # cat 1100 touches the border: invalid
    with caplog.at_level(logging.WARNING, logger="ntt_core.coco"):
        sampled = sample_references(coco, shots=3, seed=0, classes="all")
    assert sorted(sampled_ids(sampled, 1)) == [1101, 1102] and len(sampled_ids(sampled, 2)) == 3
    [warning] = sampled["info"]["ntt_sampling"]["warnings"]
    assert "'cat'" in warning and "only 2" in warning and warning in caplog.text


def test_class_seed_scope_seeds_before_each_class_shuffle():
    coco = sampling_coco(per_class=8)
    sampled = sample_references(coco, shots=3, seed=33, classes="all", seed_scope="class")
    for category_id in (1, 2):
        expected = [a["id"] for a in coco["annotations"] if a["category_id"] == category_id]
        random.seed(33)
        random.shuffle(expected)
        assert sampled_ids(sampled, category_id) == expected[:3]
    # A class's sample does not depend on the other classes sampled with it.
    alone = sample_references(coco, shots=3, seed=33, classes=["dog"], seed_scope="class")
    assert sampled_ids(alone, 2) == sampled_ids(sampled, 2)


def test_run_seed_scope_seeds_once_in_order_of_first_annotation():
    coco = sampling_coco(per_class=8)
    coco["annotations"] = coco["annotations"][8:] + coco["annotations"][:8]  # dogs first in the file
    sampled = sample_references(coco, shots=3, seed=33, classes="all", seed_scope="run")
    random.seed(33)
    expected = {}
    for category_id in (2, 1):
        ids = [a["id"] for a in coco["annotations"] if a["category_id"] == category_id]
        random.shuffle(ids)
        expected[category_id] = ids[:3]
    assert sampled_ids(sampled, 1) == expected[1] and sampled_ids(sampled, 2) == expected[2]
    assert sampled_ids(sampled, 1) != sampled_ids(
        sample_references(coco, shots=3, seed=33, classes="all", seed_scope="class"), 1
    )
    assert sample_references(coco, shots=3, seed=33, classes="all") == sampled  # the default is the authors' way


def test_sampling_leaves_the_global_generator_alone_and_is_reproducible():
    coco = sampling_coco()
    random.seed(5)
    state = random.getstate()
    first = sample_references(coco, shots=2, seed=1, classes="all")
    assert random.getstate() == state
    assert first == sample_references(coco, shots=2, seed=1, classes="all")
    assert first != sample_references(coco, shots=2, seed=2, classes="all")


def test_few_shot_classes_are_the_twenty_voc_classes_under_coco_names():
    names = list(FEW_SHOT_CLASSES) + ["giraffe", "truck"]
    coco = sampling_coco(classes=names, per_class=2)
    sampled = sample_references(coco, shots=1, seed=0)  # default: few-shot
    kept = [c["name"] for c in sampled["categories"]]
    assert len(kept) == 20 and "giraffe" not in kept and "truck" not in kept
    assert {"motorcycle", "airplane", "couch", "potted plant", "dining table", "tv"} <= set(kept)
    assert len(sampled["annotations"]) == 20
    load_coco(sampled)  # an ordinary COCO dict
    without_tv = sampling_coco(classes=[n for n in names if n != "tv"], per_class=1)
    with pytest.raises(CocoFormatError, match="unknown class.*'tv'"):
        sample_references(without_tv, shots=1, seed=0)


def test_sampling_rejects_bad_arguments():
    with pytest.raises(ValueError, match="shots must be at least 1"):
        sample_references(sampling_coco(), shots=0, seed=0, classes="all")
    with pytest.raises(ValueError, match="seed_scope"):
        sample_references(sampling_coco(), shots=1, seed=0, classes="all", seed_scope="image")


# --- results ---


def one_instance(image_size=(20, 30)) -> Instances:
    """One instance whose mask covers rows 5-8 and columns 7-12 of a 20 x 30 image."""
    crop = np.ones((4, 6), dtype=bool)
    crop[0, 0] = crop[3, 5] = False  # corners off: the extent stays the same
    return Instances(
        image_size=image_size,
        boxes=np.array([[7, 5, 13, 9]], dtype=np.int64),  # the mask's pixel extent, end-exclusive
        masks=[crop],
        labels=np.array([1]),
        class_names=["cat", "dog"],
        scores=np.array([0.75], dtype=np.float32),
        semantic_scores=np.array([0.75], dtype=np.float32),
        sam_iou=np.array([0.9], dtype=np.float32),
        merge_factors=np.array([1.0], dtype=np.float32),
    )


def test_instances_become_coco_results_with_rle():
    [result] = instances_to_coco_results(one_instance(), image_id=42, category_ids={"cat": 3, "dog": 7})
    assert result["image_id"] == 42 and result["category_id"] == 7 and result["score"] == pytest.approx(0.75)
    # The authors' inclusive box: x = first column 7, last column 12 -> w = 12 - 7; rows 5..8 -> h = 3.
    assert result["bbox"] == [7.0, 5.0, 5.0, 3.0] and all(isinstance(v, float) for v in result["bbox"])
    assert isinstance(result["segmentation"]["counts"], str) and result["segmentation"]["size"] == [20, 30]
    expected = np.zeros((20, 30), dtype=bool)
    expected[5:9, 7:13] = True  # the crop shifted by the box origin (7, 5)
    expected[5, 7] = expected[8, 12] = False
    assert np.array_equal(mask_utils.decode(result["segmentation"]).astype(bool), expected)
    json.dumps(result)  # json-serialisable as is
    with pytest.raises(CocoFormatError, match="no category id for class.*'dog'"):
        instances_to_coco_results(one_instance(), 42, {"cat": 3})
    assert instances_to_coco_results(Instances.empty((5, 5), ["cat"]), 1, {"cat": 1}) == []


def test_encode_mask_round_trip():
    mask = np.random.default_rng(0).random((17, 23)) > 0.5
    rle = encode_mask(mask)
    assert rle["size"] == [17, 23] and isinstance(rle["counts"], str)
    assert np.array_equal(annotation_mask({"segmentation": rle}, 17, 23), mask)


def test_results_writer_streams_a_json_list(tmp_path):
    path = tmp_path / "out" / "results.json"
    with ResultsWriter(path) as writer:
        writer.write([{"a": 1}, {"b": 2}])
        writer.write([])
        writer.write([{"c": 3}])
        assert not path.exists()  # only complete files carry the name
    assert json.loads(path.read_text()) == [{"a": 1}, {"b": 2}, {"c": 3}] and writer.count == 3
    with ResultsWriter(tmp_path / "empty.json"):
        pass
    assert json.loads((tmp_path / "empty.json").read_text()) == []
    with pytest.raises(RuntimeError), ResultsWriter(tmp_path / "failed.json") as writer:
        writer.write([{"a": 1}])
        raise RuntimeError("stop")
    assert list(tmp_path.glob("failed.json*")) == []


def test_targets_and_image_listing(tmp_path):
    for name in ("b.png", "a.JPG", "notes.txt", "sub/c.jpeg"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert list_images(tmp_path) == ["a.JPG", "b.png", "sub/c.jpeg"]
    with pytest.raises(CocoFormatError, match="image folder not found"):
        list_images(tmp_path / "missing")
    targets = make_targets([(1, "a.JPG", (20, 30)), (2, "b.png", (5, 6))], ["dog", "cat"])
    assert targets["categories"] == [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}]
    assert targets["images"][1] == {"id": 2, "file_name": "b.png", "height": 5, "width": 6}
    assert load_coco(targets)["annotations"] == []


# --- evaluation ---


def truth_with(*boxes) -> dict:
    """One 100 x 100 image; each box (category id, x, y, w, h) is a square ground-truth mask."""
    annotations = [
        {
            "id": i + 1,
            "image_id": 1,
            "category_id": c,
            "bbox": [x, y, w, h],
            "segmentation": encode_mask(square_mask(x, y, w, h)),
        }
        for i, (c, x, y, w, h) in enumerate(boxes)
    ]
    return {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 100}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": annotations,
    }


def detection(category_id, x, y, w, h, score=0.9, mask=None) -> dict:
    mask = square_mask(x, y, w, h) if mask is None else mask
    return {
        "image_id": 1,
        "category_id": category_id,
        "score": score,
        "bbox": [x, y, w, h],
        "segmentation": encode_mask(mask),
    }


def test_perfect_prediction_scores_one():
    report = evaluate(truth_with((1, 10, 10, 40, 40)), [detection(1, 10, 10, 40, 40)])
    for iou_type in ("bbox", "segm"):
        metrics = report[iou_type]
        for name in ("AP", "AP50", "AP75", "APm", "AR"):
            assert metrics[name] == pytest.approx(1.0), (iou_type, name)
        assert metrics["APs"] == -1.0 and metrics["APl"] == -1.0  # a 1,600 px object is "medium" only
    assert report["notes"] == []


def test_shifted_prediction_scores_by_hand():
    # Shifted 8 px: IoU = 32*40 / (2*1600 - 32*40) = 2/3, a match at IoU 0.50, 0.55, 0.60, 0.65 of the ten.
    report = evaluate(truth_with((1, 10, 10, 40, 40)), [detection(1, 18, 10, 40, 40)])
    for iou_type in ("bbox", "segm"):
        metrics = report[iou_type]
        assert metrics["AP"] == pytest.approx(0.4) and metrics["AP50"] == pytest.approx(1.0)
        assert metrics["AP75"] == 0.0 and metrics["AR"] == pytest.approx(0.4)


def test_bbox_and_segm_use_their_own_geometry():
    # Right box, but the mask covers 25 of the 40 columns: mask IoU 0.625 -> matches at 0.50, 0.55, 0.60.
    mask = square_mask(10, 10, 25, 40)
    report = evaluate(truth_with((1, 10, 10, 40, 40)), [detection(1, 10, 10, 40, 40, mask=mask)])
    assert report["bbox"]["AP"] == pytest.approx(1.0)
    assert report["segm"]["AP"] == pytest.approx(0.3) and report["segm"]["AP75"] == 0.0


def test_segm_area_ranges_use_mask_areas():
    # A false positive with a small mask (400 px) but a whole-image box, ranked above a perfect match.
    # segm: it is a small object, so APs = 1/2 (precision 1/2 at full recall); bbox: it is a large
    # one, ignored when unmatched in the small range, so APs = 1.
    truth = truth_with((1, 10, 10, 20, 20))
    stray = detection(1, 0, 0, 100, 100, score=0.95, mask=square_mask(70, 70, 20, 20))
    report = evaluate(truth, [stray, detection(1, 10, 10, 20, 20)])
    assert report["segm"]["APs"] == pytest.approx(0.5) and report["bbox"]["APs"] == pytest.approx(1.0)


def test_category_restriction():
    truth = truth_with((1, 10, 10, 40, 40), (2, 50, 50, 40, 40))
    results = [detection(1, 10, 10, 40, 40), detection(2, 20, 50, 40, 40)]  # the dog misses (IoU 1/7)
    assert evaluate(truth, results)["bbox"]["AP"] == pytest.approx(0.5)
    assert evaluate(truth, results, categories=[1])["bbox"]["AP"] == pytest.approx(1.0)
    assert evaluate(truth, results, categories=[2])["segm"]["AP"] == 0.0
    with pytest.raises(CocoFormatError, match=r"category id\(s\) \[9\] not in the ground truth"):
        evaluate(truth, results, categories=[9])


def test_evaluation_from_files_and_ground_truth_without_areas(tmp_path):
    truth = truth_with((1, 10, 10, 40, 40))
    assert "area" not in truth["annotations"][0] and "iscrowd" not in truth["annotations"][0]
    (tmp_path / "gt.json").write_text(json.dumps(truth))
    (tmp_path / "res.json").write_text(json.dumps([detection(1, 10, 10, 40, 40)]))
    report = evaluate(tmp_path / "gt.json", tmp_path / "res.json")
    assert report["segm"]["AP"] == pytest.approx(1.0) and report["categories"] == [1, 2]


def test_no_results_gives_zeros_and_a_note():
    report = evaluate(truth_with((1, 10, 10, 40, 40)), [])
    assert report["bbox"] == dict.fromkeys(report["bbox"], 0.0) and report["segm"]["AP"] == 0.0
    assert report["notes"] == ["no results: every metric is 0"]


def test_box_only_results_skip_segm_with_a_note():
    result = detection(1, 10, 10, 40, 40)
    del result["segmentation"]
    report = evaluate(truth_with((1, 10, 10, 40, 40)), [result])
    assert report["bbox"]["AP"] == pytest.approx(1.0) and "segm" not in report
    assert report["notes"] == ["segm skipped: the results have no segmentation"]


def test_box_only_ground_truth_skips_segm_with_a_note():
    truth = truth_with((1, 10, 10, 40, 40), (2, 50, 50, 40, 40))
    del truth["annotations"][1]["segmentation"]  # a box-only dog
    results = [detection(1, 10, 10, 40, 40), detection(2, 50, 50, 40, 40)]
    report = evaluate(truth, results)
    assert report["bbox"]["AP"] == pytest.approx(1.0) and "segm" not in report
    assert report["notes"] == ["segm skipped: some ground-truth annotations have no segmentation"]
    assert evaluate(truth, results, categories=[1])["segm"]["AP"] == pytest.approx(1.0)  # cats have masks


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r.update(image_id=5), "result #0 is for image id 5, which is not in the ground truth"),
        (lambda r: r.update(category_id=9), "result #0 has category id 9, which is not in the ground truth"),
        (lambda r: r.pop("score"), "result #0 lacks score"),
        (
            lambda r: r.update(segmentation=encode_mask(np.zeros((10, 10), bool))),
            "segmentation must be an RLE dict of the image's size",
        ),
    ],
)
def test_bad_results_are_rejected(edit, message):
    result = detection(1, 10, 10, 40, 40)
    edit(result)
    with pytest.raises(CocoFormatError) as error:
        evaluate(truth_with((1, 10, 10, 40, 40)), [result])
    assert message in str(error.value)
