"""The FiftyOne adapter on real (non-persistent) datasets of synthetic scenes.

The models are the deterministic stand-ins of :mod:`ntt_core.standins`, so predictions are
meaningful: they must land on the scenes' own masks, which the tests know independently.
"""

import base64
from pathlib import Path

import fiftyone as fo
import numpy as np
import pytest
from fiftyone_scenes import field_documents, scenes_dataset, without_eval_attributes
from PIL import Image

from ntt_core.fiftyone.bank_runs import (
    check_bank_key,
    delete_memory_bank,
    export_memory_bank,
    import_memory_bank,
    list_memory_banks,
    load_memory_bank,
    memory_bank_info,
)
from ntt_core.fiftyone.building import build_dataset_memory_bank
from ntt_core.fiftyone.evaluation import evaluate, pycocotools_figures
from ntt_core.fiftyone.fields import FiftyOneAdapterError, image_collection
from ntt_core.fiftyone.labels import boxes_to_masks, instances_to_detections
from ntt_core.fiftyone.predictions import (
    plan_shards,
    prediction_record,
    reference_model,
    segment_by_reference,
    start_sharded_prediction,
)
from ntt_core.fiftyone.references import collect_references, count_references
from ntt_core.geometry import pixel_box, place_mask
from ntt_core.instances import Instances
from ntt_core.memory_bank import MemoryBankError
from ntt_core.settings import Settings
from ntt_core.standins import ColourStatsEncoder, ConnectedRegionSegmenter
from ntt_core.synthetic import make_dataset

SETTINGS = Settings(points_per_side=12)  # every scene instance gets a prompt inside it
COUNT, SIZE, SEED = 4, (72, 88), 3


@pytest.fixture(scope="module")
def models():
    return ConnectedRegionSegmenter(), ColourStatsEncoder()


@pytest.fixture
def dataset(tmp_path):
    dataset = scenes_dataset(tmp_path, COUNT, SIZE, SEED)
    yield dataset
    dataset.delete()


@pytest.fixture
def banked(dataset, models):
    build_dataset_memory_bank(dataset, "bank", "gt", *models)
    return dataset


def scenes():
    return make_dataset(COUNT, seed=SEED, size=SIZE)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


# --- references ---


def test_tagged_labels_become_references_with_their_masks_in_place(dataset):
    tagged = {
        label.id: (sample.id, index, label.label)
        for sample in dataset
        for index, label in enumerate(sample.gt.detections)
        if "reference" in label.tags
    }
    selection = collect_references(dataset, "gt")
    found = {}
    for image in selection.images:
        for instance in image.instances:
            found[instance.reference_id] = (image.image_id, instance)
    assert set(found) == set(tagged)
    truth = scenes()
    sample_index = {sample.id: i for i, sample in enumerate(dataset)}
    for label_id, (sample_id, instance) in found.items():
        expected_sample, index, name = tagged[label_id]
        scene = truth[sample_index[sample_id]]
        assert sample_id == expected_sample and instance.class_name == name
        assert np.array_equal(instance.mask, scene.masks[index])  # the crop is back at its pixels
        assert tuple(instance.box) == tuple(scene.boxes[index])
    assert selection.counts == {name: 1 for name in {v[2] for v in tagged.values()}}
    assert selection.skipped == []


def test_sample_tags_label_ids_classes_and_cap(dataset):
    first = dataset.first()
    first.tags.append("refs")
    first.save()
    names = [label.label for label in first.gt.detections]
    selection = collect_references(dataset, "gt", mode="sample_tag", tag="refs")
    assert [i.reference_id for i in selection.images[0].instances] == [label.id for label in first.gt.detections]
    one = names[0]
    only = collect_references(dataset, "gt", mode="sample_tag", tag="refs", classes=[one])
    assert {i.class_name for image in only.images for i in image.instances} == {one}

    every = [label.id for sample in dataset for label in sample.gt.detections if label.label == one]
    capped = collect_references(dataset, "gt", mode="label_ids", label_ids=every, max_per_class=2)
    assert [i.reference_id for image in capped.images for i in image.instances] == every[:2]
    assert count_references(dataset, "gt", mode="label_ids", label_ids=every) == {one: len(every)}


@pytest.mark.bad_input
def test_no_reference_found_is_a_clear_error(dataset):
    with pytest.raises(FiftyOneAdapterError, match="no reference found: no label of 'gt' is tagged 'nothing'"):
        collect_references(dataset, "gt", tag="nothing")
    with pytest.raises(
        FiftyOneAdapterError, match="no reference found: no sample tagged 'reference' has labels in 'gt'"
    ):
        collect_references(dataset, "gt", mode="sample_tag")
    with pytest.raises(FiftyOneAdapterError, match="no labels selected"):
        collect_references(dataset, "gt", mode="label_ids", label_ids=[])
    name = dataset.distinct("gt.detections.label")[0]
    with pytest.raises(FiftyOneAdapterError, match="no reference for class\\(es\\) 'unicorn'"):
        count_references(dataset, "gt", classes=[name, "unicorn"])
    with pytest.raises(FiftyOneAdapterError, match="reference mode 'everything' is unknown"):
        collect_references(dataset, "gt", mode="everything")


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("label", "message"),
    [
        (fo.Classification(label="disc"), "ground-truth field 'other' holds Classification, not Detections"),
        (fo.Polylines(polylines=[]), "ground-truth field 'other' holds Polylines, not Detections"),
        (
            fo.Classifications(classifications=[fo.Classification(label="disc")]),
            "ground-truth field 'other' holds Classifications, not Detections",
        ),
        (fo.Keypoints(keypoints=[]), "ground-truth field 'other' holds Keypoints, not Detections"),
        (fo.Segmentation(mask=np.zeros((4, 4), dtype=np.uint8)), "ground-truth field 'other' holds Segmentation"),
        (fo.Detection(label="disc", bounding_box=[0.1, 0.1, 0.2, 0.2]), "ground-truth field 'other' holds Detection,"),
    ],
)
def test_wrong_label_type_is_refused(dataset, label, message):
    sample = dataset.first()
    sample["other"] = label
    sample.save()
    with pytest.raises(FiftyOneAdapterError, match=message):
        collect_references(dataset, "other")
    with pytest.raises(
        FiftyOneAdapterError, match="ground-truth field 'missing' does not exist; Detections fields: gt"
    ):
        collect_references(dataset, "missing")


@pytest.mark.bad_input
def test_unusable_references_are_skipped_and_reported(dataset, models, tmp_path):
    sample = dataset.first()
    broken, boxless, box_only = sample.gt.detections[:3]
    for label in (broken, boxless, box_only):
        label.tags = ["reference"]
    broken.mask, broken.mask_path = None, str(tmp_path / "gone.png")
    boxless.bounding_box = [0.5, 0.5, 0.0, 0.2]
    box_only.mask = None
    sample.save()
    report = build_dataset_memory_bank(dataset, "bank", "gt", *models)
    reasons = {s["reference_id"]: s["reason"] for s in report["skipped"]}
    assert set(reasons) == {broken.id, boxless.id}
    assert "instance mask unreadable" in reasons[broken.id]
    assert "bounding box [0.5, 0.5, 0.0, 0.2] is missing, empty or outside the image" in reasons[boxless.id]
    assert box_only.id in load_memory_bank(dataset, "bank").reference_ids  # SAM2's box prompt gave it a mask


def test_unreadable_reference_image_is_skipped(dataset, models):
    sample = dataset.first()
    Path(sample.filepath).write_bytes(b"not an image")
    report = build_dataset_memory_bank(dataset, "bank", "gt", *models, classes=None)
    skipped_ids = {s["reference_id"] for s in report["skipped"]}
    assert skipped_ids == {label.id for label in sample.gt.detections if "reference" in label.tags}
    assert all("unreadable or corrupt image" in s["reason"] for s in report["skipped"])


# --- memory banks as runs ---


def test_bank_is_a_run_that_round_trips_exports_and_imports(banked, models, tmp_path):
    dataset = banked
    assert list_memory_banks(dataset) == ["bank"]
    info = memory_bank_info(dataset, "bank")
    tagged = [label for sample in dataset for label in sample.gt.detections if "reference" in label.tags]
    assert info["gt_field"] == "gt" and info["reference_mode"] == "label_tag"
    assert info["counts"] == {label.label: 1 for label in tagged}
    assert set(info["reference_sample_ids"]) == {
        s.id for s in dataset if any("reference" in d.tags for d in s.gt.detections)
    }

    reloaded = fo.load_dataset(dataset.name)  # what another process sees
    bank = load_memory_bank(reloaded, "bank")
    assert sorted(bank.reference_ids) == sorted(label.id for label in tagged)
    assert bank.encoder_fingerprint == models[1].fingerprint

    folder = export_memory_bank(dataset, "bank", tmp_path / "exported")
    assert sorted(p.name for p in folder.iterdir()) == ["features.safetensors", "manifest.json"]
    other = fo.Dataset()
    try:
        imported = import_memory_bank(other, "copy", folder)
        again = load_memory_bank(other, "copy")
        assert again.descriptors.equal(bank.descriptors) and again.classes == bank.classes == imported.classes
        assert memory_bank_info(other, "copy")["imported_from"] == str(folder)
    finally:
        other.delete()

    delete_memory_bank(dataset, "bank")
    assert list_memory_banks(dataset) == []
    with pytest.raises(
        FiftyOneAdapterError,
        match=r"no memory bank 'bank' on dataset '.*' \(the dataset has no memory bank; build one first\)",
    ):
        load_memory_bank(dataset, "bank")


@pytest.mark.bad_input
def test_tampered_stored_bank_is_refused(banked):
    payload = load_memory_bank(banked, "bank").to_payload()
    tensors = bytearray(base64.b64decode(payload["tensors"]))
    tensors[-5] ^= 0xFF
    tampered = {"manifest": payload["manifest"], "tensors": base64.b64encode(bytes(tensors)).decode()}
    banked.save_run_results("bank", banked.init_run_results("bank", bank=tampered), overwrite=True, cache=False)
    with pytest.raises(MemoryBankError, match="checksum mismatch"):
        load_memory_bank(banked, "bank")


@pytest.mark.bad_input
def test_bank_names_are_checked(banked, models, tmp_path):
    with pytest.raises(FiftyOneAdapterError, match="memory bank 'bank' already exists"):
        build_dataset_memory_bank(banked, "bank", "gt", *models)
    with pytest.raises(FiftyOneAdapterError, match="memory bank name 'my bank' is invalid"):
        check_bank_key(banked, "my bank")
    with pytest.raises(MemoryBankError, match="not a memory bank"):
        import_memory_bank(banked, "other", tmp_path)
    folder = export_memory_bank(banked, "bank", tmp_path / "exported")
    tensors = folder / "features.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-7])
    with pytest.raises(MemoryBankError, match="checksum mismatch, the memory bank is truncated or was modified"):
        import_memory_bank(banked, "truncated", folder)
    assert list_memory_banks(banked) == ["bank"]
    with pytest.raises(FiftyOneAdapterError, match="export folder is not empty"):
        (tmp_path / "full").mkdir()
        (tmp_path / "full" / "x").write_text("x")
        export_memory_bank(banked, "bank", tmp_path / "full")


# --- predictions ---


def test_instances_become_detections_with_relative_boxes_and_cropped_masks():
    crop = np.zeros((6, 5), dtype=bool)
    crop[1:5, 1:4] = True
    instances = Instances(
        image_size=(10, 20),
        boxes=np.array([[2, 3, 7, 9], [0, 0, 4, 4]]),
        masks=[crop, np.zeros((4, 4), dtype=bool)],
        labels=np.array([1, 0]),
        class_names=["cat", "dog"],
        scores=np.array([0.9, 0.5], dtype=np.float32),
        semantic_scores=np.array([0.95, 0.5], dtype=np.float32),
        sam_iou=np.array([0.8, 0.7], dtype=np.float32),
        merge_factors=np.array([0.947, 1.0], dtype=np.float32),
        reference_ids=["r1", "r2"],
    )
    detections = instances_to_detections(instances)
    assert len(detections.detections) == 1  # the empty mask is left out
    det = detections.detections[0]
    assert det.label == "dog" and det.bounding_box == pytest.approx([2 / 20, 3 / 10, 5 / 20, 6 / 10])
    assert np.array_equal(det.mask, crop)
    assert det.confidence == pytest.approx(0.9) and det.reference_id == "r1"
    assert (det.sam_iou, det.semantic_score, det.merge_factor) == pytest.approx((0.8, 0.95, 0.947))
    assert pixel_box(det.bounding_box, (10, 20)) == (2, 3, 7, 9)
    assert np.array_equal(place_mask(det.mask, (2, 3, 7, 9), (10, 20)), instances.full_mask(0))
    assert len(instances_to_detections(Instances.empty((10, 20), ["cat"])).detections) == 0


@pytest.mark.parametrize("size", [(37, 53), (480, 640), (1001, 999)])
def test_integer_boxes_survive_relative_coordinates(size):
    rng = np.random.default_rng(size[0])
    for _ in range(200):
        x0, x1 = sorted(rng.choice(size[1] + 1, 2, replace=False))
        y0, y1 = sorted(rng.choice(size[0] + 1, 2, replace=False))
        h, w = size
        assert pixel_box([x0 / w, y0 / h, (x1 - x0) / w, (y1 - y0) / h], size) == (x0, y0, x1, y1)


def test_predictions_land_on_the_instances_and_ground_truth_is_untouched(banked, models, tmp_path):
    dataset = banked
    before = field_documents(dataset, "gt")
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((64, 64, 3), 128, dtype=np.uint8)).save(blank)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG truncated")
    dataset.add_samples([fo.Sample(filepath=str(blank)), fo.Sample(filepath=str(broken))])

    report = segment_by_reference(dataset, "bank", "pred", *models, settings=SETTINGS, batch_size=2)
    after = field_documents(dataset, "gt")
    assert {k: after[k] for k in before} == before
    assert report["processed"] == COUNT + 1 and report["skipped_existing"] == 0
    assert report["instances"] == dataset.count("pred.detections") > 0
    assert [f["sample_id"] for f in report["failed"]] == [dataset.last().id]
    assert "broken.png" in report["failed"][0]["reason"]
    assert dataset.last().pred is None  # unreadable: left empty, to be retried
    assert dataset.skip(COUNT).first().pred.detections == []  # nothing found: empty Detections

    truth = scenes()
    matched = total = 0
    for sample, scene in zip(dataset.limit(COUNT), truth):
        height, width = scene.image.shape[:2]
        predicted = [
            (d.label, place_mask(d.mask, pixel_box(d.bounding_box, (height, width)), (height, width)))
            for d in sample.pred.detections
        ]
        for mask, name in zip(scene.masks, scene.class_names):
            total += 1
            matched += any(label == name and mask_iou(mask, m) > 0.7 for label, m in predicted)
        for det in sample.pred.detections:
            x0, y0, x1, y1 = pixel_box(det.bounding_box, (height, width))
            assert det.mask.shape == (y1 - y0, x1 - x0)
            assert det.reference_id in load_memory_bank(dataset, "bank").reference_ids
            assert 0.0 <= det.confidence <= det.semantic_score + 1e-6 and 0.0 < det.merge_factor <= 1.0
    assert matched >= 0.8 * total

    record = prediction_record(dataset, "pred")
    assert record["bank_key"] == "bank" and record["settings"] == SETTINGS.to_dict()
    assert record["segmenter_fingerprint"] == models[0].fingerprint and record["gt_field"] == "gt"


class FailingSegmenter:
    """The stand-in segmenter, failing from its ``fail_at``-th image batch on (a crash mid-run)."""

    def __init__(self, inner, fail_at: int) -> None:
        self.inner, self.fail_at, self.calls = inner, fail_at, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def embed(self, images):
        self.calls += 1
        if self.calls >= self.fail_at:
            raise RuntimeError("CUDA out of memory (simulated)")
        return self.inner.embed(images)


def test_a_failure_keeps_finished_samples_and_skip_existing_finishes(banked, models):
    segmenter, encoder = models
    with pytest.raises(
        FiftyOneAdapterError,
        match="stopped after 2 of 4 samples: CUDA out of memory .* run again with skip_existing",
    ):
        segment_by_reference(banked, "bank", "pred", FailingSegmenter(segmenter, 3), encoder, settings=SETTINGS)
    done = banked.exists("pred")
    assert len(done) == 2
    kept = {s.id: [d.id for d in s.pred.detections] for s in done}
    with pytest.raises(FiftyOneAdapterError, match="field 'pred' already exists"):
        segment_by_reference(banked, "bank", "pred", segmenter, encoder, settings=SETTINGS)
    with pytest.raises(FiftyOneAdapterError, match="written with a different settings"):
        segment_by_reference(
            banked, "bank", "pred", segmenter, encoder, settings=SETTINGS.replace(max_detections=5), skip_existing=True
        )
    smaller_batch = SETTINGS.replace(
        prompt_batch_size=1
    )  # the usual answer to running out of memory: no result changes
    report = segment_by_reference(
        banked, "bank", "pred", segmenter, encoder, settings=smaller_batch, skip_existing=True
    )
    assert (report["processed"], report["skipped_existing"]) == (2, 2)
    assert len(banked.exists("pred")) == COUNT
    assert {s.id: [d.id for d in s.pred.detections] for s in banked.select(list(kept))} == kept

    report = segment_by_reference(banked, "bank", "pred", segmenter, encoder, settings=SETTINGS, overwrite=True)
    assert report["processed"] == COUNT
    assert all(not set(kept[s.id]) & {d.id for d in s.pred.detections} for s in banked.select(list(kept)) if kept[s.id])


@pytest.mark.bad_input
def test_overwrite_refused_for_a_run_key_taken_by_another_run_keeps_the_field(banked, models):
    segmenter, encoder = models
    segment_by_reference(banked, "bank", "pred", segmenter, encoder, settings=SETTINGS)
    written = {s.id: [d.id for d in s.pred.detections] for s in banked}
    banked.delete_run("segmentation_pred")  # the record lives on under the earlier key; another run takes the new one
    banked.register_run("ntt_predictions_pred", banked.init_run(method="ntt_predictions", pred_field="pred"))
    banked.register_run("segmentation_pred", banked.init_run(method="someone_else"))
    with pytest.raises(FiftyOneAdapterError, match="run key 'segmentation_pred' is taken by another run"):
        segment_by_reference(banked, "bank", "pred", segmenter, encoder, settings=SETTINGS, overwrite=True)
    assert {s.id: [d.id for d in s.pred.detections] for s in banked} == written  # nothing cleared


def test_overwrite_replaces_a_record_under_the_earlier_run_key(banked, models):
    segmenter, encoder = models
    banked.add_sample_field("pred", fo.EmbeddedDocumentField, embedded_doc_type=fo.Detections)
    banked.register_run("ntt_predictions_pred", banked.init_run(method="ntt_predictions", pred_field="pred"))
    segment_by_reference(banked, "bank", "pred", segmenter, encoder, settings=SETTINGS, overwrite=True)
    assert "ntt_predictions_pred" not in banked.list_runs()
    assert prediction_record(banked, "pred")["bank_key"] == "bank"


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("field", "message"),
    [
        ("gt", "'gt' is a ground-truth field"),
        ("filepath", "output field name 'filepath' is reserved"),
        ("metadata", "output field name 'metadata' is reserved"),
        ("my preds", "output field name 'my preds' is invalid"),
        ("_private", "output field name '_private' is invalid"),
        ("a.b", "output field name 'a.b' is invalid"),
        ("weather", "field 'weather' exists and holds Classification, not Detections"),
    ],
)
def test_bad_output_fields_are_refused(banked, models, field, message):
    sample = banked.first()
    sample["weather"] = fo.Classification(label="sunny")
    sample.save()
    with pytest.raises(FiftyOneAdapterError, match=message):
        segment_by_reference(banked, "bank", field, *models, settings=SETTINGS)
    assert not banked.has_field("pred")


@pytest.mark.bad_input
def test_bank_missing_or_built_with_other_models(banked, models):
    with pytest.raises(FiftyOneAdapterError, match="no memory bank 'gone'.*available: bank"):
        segment_by_reference(banked, "gone", "pred", *models, settings=SETTINGS)
    with pytest.raises(MemoryBankError, match="this memory bank was built with encoder 'standin:colour-stats'"):
        segment_by_reference(banked, "bank", "pred", models[0], ColourStatsEncoder(hue_bins=6), settings=SETTINGS)
    assert not banked.has_field("pred")  # nothing was created before the check
    with pytest.raises(FiftyOneAdapterError, match="the target view is empty"):
        segment_by_reference(banked.limit(0), "bank", "pred", *models, settings=SETTINGS)


@pytest.mark.bad_input
def test_video_and_grouped_collections_are_refused(tmp_path):
    video = fo.Dataset()
    group = fo.Dataset()
    try:
        video.add_sample(fo.Sample(filepath=str(tmp_path / "clip.mp4")))
        with pytest.raises(FiftyOneAdapterError, match="only image samples can be processed; .* type 'video'"):
            image_collection(video)
        group.add_group_field("group", default="left")
        g = fo.Group()
        group.add_sample(fo.Sample(filepath=str(tmp_path / "a.png"), group=g.element("left")))
        with pytest.raises(FiftyOneAdapterError, match="is a grouped dataset: select one image slice first"):
            image_collection(group)
    finally:
        video.delete()
        group.delete()


def test_patch_views_map_to_their_images(dataset):
    patches = dataset.limit(2).to_patches("gt")
    images, note = image_collection(patches)
    assert images.values("id") == dataset.limit(2).values("id")
    assert note == "patch view mapped to its 2 source image(s)"


def test_model_wrapper_with_apply_model_matches_the_operator_path(banked, models):
    segment_by_reference(banked, "bank", "pred", *models, settings=SETTINGS)
    banked.apply_model(reference_model(banked, "bank", *models, settings=SETTINGS), "applied")
    for sample in banked:
        ours = [(d.label, d.bounding_box, d.confidence) for d in sample.pred.detections]
        theirs = [(d.label, d.bounding_box, d.confidence) for d in sample.applied.detections]
        assert ours == theirs


def test_shards_fix_disjoint_ids_and_create_the_field_first(banked, models):
    segment_by_reference(banked.limit(1), "bank", "pred", *models, settings=SETTINGS)
    shards = start_sharded_prediction(
        banked, "bank", "pred", *models, num_shards=2, settings=SETTINGS, skip_existing=True
    )
    remaining = banked.skip(1).values("id")
    assert [i for shard in shards for i in shard] == remaining and len(shards) == 2
    assert banked.has_field("pred") and prediction_record(banked, "pred")["bank_key"] == "bank"
    for shard in shards:
        segment_by_reference(banked.select(shard), "bank", "pred", *models, settings=SETTINGS, skip_existing=True)
    assert len(banked.exists("pred")) == COUNT
    assert plan_shards(banked, "pred", 3) == []


def test_boxes_to_masks_fills_box_only_labels_into_a_new_field(dataset, models):
    before = field_documents(dataset, "gt")
    boxes = [
        fo.Detections(detections=[fo.Detection(label=d.label, bounding_box=d.bounding_box) for d in s.gt.detections])
        for s in dataset
    ]
    dataset.set_values("boxes", boxes)
    kept = dataset.first().gt.detections[0]
    first = dataset.first()
    first.boxes.detections.append(fo.Detection(label="kept", bounding_box=kept.bounding_box, mask=kept.mask))
    first.save()

    report = boxes_to_masks(dataset, "boxes", models[0], out_field="boxes_masks")
    assert report["kept"] == 1 and report["failed"] == []
    truth = scenes()
    good = total = 0
    for sample, scene in zip(dataset, truth):
        size = scene.image.shape[:2]
        assert all(d.mask is None for d in sample.boxes.detections if d.label != "kept")  # the input is untouched
        for det, mask in zip(sample.boxes_masks.detections, scene.masks):
            total += 1
            good += mask_iou(place_mask(det.mask, pixel_box(det.bounding_box, size), size), mask) > 0.7
    assert good >= 0.8 * total and report["filled"] == total
    assert field_documents(dataset, "gt") == before

    build_dataset_memory_bank(dataset, "bank", "gt", *models)
    with pytest.raises(FiftyOneAdapterError, match="'gt' is a ground-truth field: write the masks to a new field"):
        boxes_to_masks(dataset, "gt", models[0])
    with pytest.raises(FiftyOneAdapterError, match="field 'boxes_masks' already exists"):
        boxes_to_masks(dataset, "boxes", models[0], out_field="boxes_masks")


# --- evaluation ---


def test_evaluation_matches_pycocotools_and_leaves_ground_truth_restorable(banked, models):
    dataset = banked
    sample = dataset.last()
    sample.gt.detections.append(
        fo.Detection(label="unbanked", bounding_box=[0.1, 0.1, 0.2, 0.2], mask=np.ones((14, 17), dtype=bool))
    )
    sample.save()
    before = field_documents(dataset, "gt")
    segment_by_reference(dataset, "bank", "pred", *models, settings=SETTINGS)
    assert field_documents(dataset, "gt") == before

    report = evaluate(dataset, "pred", "ev")
    references = {s.id for s in dataset if any("reference" in d.tags for d in s.gt.detections)}
    assert report["samples"] == COUNT - len(references)
    assert f"{len(references)} sample(s) holding references excluded" in report["notes"][0]
    assert report["mAP"] == pytest.approx(report["pycocotools"]["segm"]["AP"], abs=1e-6)
    assert report["mAP"] > 0.5
    stored = dataset.load_evaluation_results("ev")
    assert stored.custom_metrics["pycocotools_segm_AP"]["value"] == report["pycocotools"]["segm"]["AP"]
    assert stored.metrics()["pycocotools_bbox_AP"] == report["pycocotools"]["bbox"]["AP"]  # what the panel shows

    assert without_eval_attributes(dataset, "gt", "ev") == before  # only <eval_key> attributes were added
    unbanked = [d for d in dataset.last().gt.detections if d.label == "unbanked"][0]
    assert not unbanked.has_field("ev")  # classes outside the bank are not scored
    dataset.delete_evaluation("ev")
    assert field_documents(dataset, "gt") == before  # byte for byte


@pytest.mark.bad_input
def test_evaluation_keys_and_fields_are_checked(banked, models):
    segment_by_reference(banked, "bank", "pred", *models, settings=SETTINGS)
    evaluate(banked, "pred", "ev")
    with pytest.raises(FiftyOneAdapterError, match="evaluation 'ev' already exists"):
        evaluate(banked, "pred", "ev")
    with pytest.raises(FiftyOneAdapterError, match="evaluation key 'ev-2' is invalid"):
        evaluate(banked, "pred", "ev-2")
    with pytest.raises(FiftyOneAdapterError, match="the prediction and ground-truth fields must differ"):
        evaluate(banked, "pred", "ev3", gt_field="pred")
    with pytest.raises(FiftyOneAdapterError, match="no sample left to evaluate"):
        evaluate(banked.select(prediction_record(banked, "pred")["reference_sample_ids"]), "pred", "ev4")
    report = evaluate(banked, "pred", "ev", overwrite=True, exclude_references=False)
    assert report["samples"] == COUNT


@pytest.mark.bad_input
def test_class_names_that_need_escaping_and_tiny_images(dataset, models, tmp_path):
    names = {"disc": "potted plant", "square": "a.b$c", "triangle": 'it\'s "x"', "star": "{label}"}
    for sample in dataset.iter_samples(autosave=True):
        for label in sample.gt.detections:
            label.label = names[label.label]
    one_pixel = tmp_path / "one.png"
    Image.fromarray(np.zeros((1, 1, 3), dtype=np.uint8)).save(one_pixel)
    dataset.add_sample(fo.Sample(filepath=str(one_pixel)))
    build_dataset_memory_bank(dataset, "bank", "gt", *models)
    assert set(memory_bank_info(dataset, "bank")["classes"]) == set(dataset.distinct("gt.detections.label"))
    report = segment_by_reference(dataset, "bank", "pred", *models, settings=SETTINGS)
    assert [f["sample_id"] for f in report["failed"]] == [dataset.last().id]
    assert "1x1 px is smaller than one" in report["failed"][0]["reason"]
    assert set(dataset.distinct("pred.detections.label")) <= set(names.values())
    evaluation = evaluate(dataset, "pred", "ev", classes=[*names.values(), "ghost"])
    assert evaluation["mAP"] > 0.5
    (absent,) = [note for note in evaluation["notes"] if note.endswith("have no ground truth in the evaluated samples")]
    assert "'ghost'" in absent


def test_pycocotools_figures_honour_crowd_ground_truth(tmp_path):
    """A crowd region (COCO's ``iscrowd``, kept by FiftyOne's COCO importer) is not a miss."""
    path = tmp_path / "image.png"
    Image.fromarray(np.zeros((40, 60, 3), dtype=np.uint8)).save(path)
    square = np.ones((10, 10), dtype=bool)
    crowd = fo.Detection(label="cat", bounding_box=[0.5, 0.5, 1 / 6, 0.25], mask=square, iscrowd=1)
    cat = fo.Detection(label="cat", bounding_box=[0.1, 0.1, 1 / 6, 0.25], mask=square, iscrowd=0)
    predicted = cat.copy()
    predicted.confidence = 0.9
    dataset = fo.Dataset()
    sample = fo.Sample(filepath=str(path), gt=fo.Detections(detections=[cat, crowd]))
    sample["pred"] = fo.Detections(detections=[predicted])
    dataset.add_sample(sample)
    figures = pycocotools_figures(dataset, "pred", "gt", ["cat"])
    # The prediction's results box is the authors' inclusive one, 9 x 9 px inside the 10 x 10 px truth:
    # IoU 0.81, a hit at the thresholds 0.50 ... 0.80 (7 of 10), so box AP 0.7; its mask is exact.
    assert figures["segm"]["AP"] == pytest.approx(1.0) and figures["bbox"]["AP"] == pytest.approx(0.7)
    dataset.delete()


def test_segmenting_again_uses_the_candidate_cache_by_default(banked, models, tmp_path, monkeypatch):
    monkeypatch.setenv("NTT_CACHE_DIR", str(tmp_path / "cache"))
    segment_by_reference(banked, "bank", "first", *models, settings=SETTINGS)
    entries = {path.name: path.stat().st_ino for path in (tmp_path / "cache").iterdir()}  # a rewrite renames a new file
    assert len(entries) == len(banked)
    segment_by_reference(banked, "bank", "again", *models, settings=SETTINGS)
    segment_by_reference(banked, "bank", "uncached", *models, settings=SETTINGS, cache=None)
    assert {path.name: path.stat().st_ino for path in (tmp_path / "cache").iterdir()} == entries
    for sample in banked:
        first, again, uncached = (
            [(d.label, d.bounding_box, d.confidence, d.mask.tolist()) for d in sample[field].detections]
            for field in ("first", "again", "uncached")
        )
        assert first == again == uncached
