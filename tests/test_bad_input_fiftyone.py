"""Bad input to the FiftyOne adapter and the operators: media that is missing or not images,
references without geometry, a bank for other classes, bad field names and out-of-range parameters.

Each case gives a specific message (a form error for the operators), or is processed with the
problem reported per sample; nothing is half written and ground truth is never touched.
"""

import re
from pathlib import Path

import fiftyone as fo
import fiftyone.operators as foo
import pytest
from fiftyone.operators.executor import ExecutionError
from fiftyone_scenes import field_documents, scenes_dataset
from test_plugin import FAST, inputs_of, run, uri

from ntt_core.fiftyone.bank_runs import (
    export_memory_bank,
    import_memory_bank,
    list_memory_banks,
    load_memory_bank,
    memory_bank_info,
)
from ntt_core.fiftyone.building import build_dataset_memory_bank
from ntt_core.fiftyone.evaluation import evaluate
from ntt_core.fiftyone.fields import FiftyOneAdapterError, check_output_field, image_collection
from ntt_core.fiftyone.labels import boxes_to_masks
from ntt_core.fiftyone.predictions import prediction_record, segment_by_reference, start_sharded_prediction
from ntt_core.fiftyone.references import collect_references, count_references
from ntt_core.input_rules import InputError
from ntt_core.references import InvalidReferenceError
from ntt_core.settings import Settings
from ntt_core.standins import ColourStatsEncoder, ConnectedRegionSegmenter

pytestmark = pytest.mark.bad_input
SETTINGS = Settings(points_per_side=12)


@pytest.fixture(scope="module")
def models():
    return ConnectedRegionSegmenter(), ColourStatsEncoder()


@pytest.fixture
def dataset(tmp_path):
    dataset = scenes_dataset(tmp_path, 4, (72, 88), 3)
    yield dataset
    dataset.delete()


def unreferenced(dataset) -> fo.Sample:
    """A sample none of whose labels is a reference."""
    return next(s for s in dataset if not any("reference" in d.tags for d in s.gt.detections))


@pytest.fixture
def media(tmp_path):
    """A video dataset and a grouped dataset of images."""
    video, group = fo.Dataset(), fo.Dataset()
    video.add_sample(fo.Sample(filepath=str(tmp_path / "clip.mp4")))
    group.add_group_field("group", default="left")
    element = fo.Group()
    for name in ("left", "right"):
        group.add_sample(fo.Sample(filepath=str(tmp_path / f"{name}.png"), group=element.element(name)))
    yield video, group
    video.delete()
    group.delete()


# --- references ---


def test_a_reference_without_mask_or_box_is_skipped_with_the_reason(dataset, models):
    sample = dataset.first()
    bare = sample.gt.detections[1]
    bare.tags, bare.bounding_box, bare.mask = ["reference"], None, None
    sample.save()
    report = build_dataset_memory_bank(dataset, "bank", "gt", *models)
    assert [s for s in report["skipped"] if s["reference_id"] == bare.id] == [
        {
            "reference_id": bare.id,
            "class_name": bare.label,
            "reason": "bounding box [] is missing, empty or outside the image",
        }
    ]
    assert bare.id not in load_memory_bank(dataset, "bank").reference_ids


def test_a_reference_tag_that_matches_nothing_names_the_tag_field_and_classes(dataset):
    with pytest.raises(FiftyOneAdapterError) as error:
        count_references(dataset, "gt", tag="Reference")  # tags are case-sensitive
    assert str(error.value) == "no reference found: no label of 'gt' is tagged 'Reference'"
    with pytest.raises(FiftyOneAdapterError) as error:
        count_references(dataset, "gt", mode="sample_tag", tag="refs", classes=["disc"])
    assert str(error.value) == "no reference found: no sample tagged 'refs' has labels in 'gt' among classes 'disc'"


# --- media ---


def test_missing_media_is_reported_per_sample_and_resumable(dataset, models):
    build_dataset_memory_bank(dataset, "bank", "gt", *models)
    boxes = [[fo.Detection(label=d.label, bounding_box=d.bounding_box) for d in s.gt.detections] for s in dataset]
    dataset.set_values("boxes", [fo.Detections(detections=b) for b in boxes])
    gt_before = field_documents(dataset, "gt")
    gone = unreferenced(dataset)
    path = Path(gone.filepath)
    kept = path.read_bytes()
    path.unlink()

    report = segment_by_reference(dataset, "bank", "pred", *models, settings=SETTINGS)
    assert report["failed"] == [{"sample_id": gone.id, "reason": f"{path}: image file not found"}]
    assert report["processed"] == len(dataset) - 1
    assert dataset[gone.filepath].pred is None  # left empty, so a resumed run picks it up

    report = boxes_to_masks(dataset, "boxes", models[0], out_field="boxes_sam2")
    assert report["failed"] == [{"sample_id": gone.id, "reason": f"{path}: image file not found"}]
    assert report["samples"] == len(dataset) - 1 and dataset[gone.filepath].boxes_sam2 is None

    gone.tags.append("refs")
    gone.save()
    selection = collect_references(dataset, "gt", mode="sample_tag", tag="refs")
    assert selection.images == []
    assert selection.skipped == [
        {"reference_id": label.id, "class_name": label.label, "reason": f"{path}: image file not found"}
        for label in gone.gt.detections
    ]
    with pytest.raises(InvalidReferenceError) as error:  # every reference is unusable: no bank
        build_dataset_memory_bank(dataset, "refs", "gt", *models, mode="sample_tag", tag="refs")
    assert str(error.value) == "no usable reference at all. Unusable in 'gt': " + "; ".join(
        f"{label.id} ({label.label}): {path}: image file not found" for label in gone.gt.detections
    )
    assert "refs" not in list_memory_banks(dataset)

    evaluation = evaluate(dataset, "pred", "ev")
    assert f"1 unreadable image(s) left out of the pycocotools figures: {path}" in evaluation["notes"]
    dataset.delete_evaluation("ev")

    path.write_bytes(kept)
    report = segment_by_reference(dataset, "bank", "pred", *models, settings=SETTINGS, skip_existing=True)
    assert (report["processed"], report["skipped_existing"], report["failed"]) == (1, len(dataset) - 1, [])
    assert field_documents(dataset, "gt") == gt_before


def test_video_and_grouped_collections_are_refused_everywhere(media, models):
    video, group = media
    image_only = "only image samples can be processed; this collection holds media of type 'video'"
    for call in (
        lambda: count_references(video, "gt"),
        lambda: collect_references(video, "gt"),
        lambda: build_dataset_memory_bank(video, "bank", "gt", *models),
        lambda: segment_by_reference(video, "bank", "pred", *models),
        lambda: start_sharded_prediction(video, "bank", "pred", *models, num_shards=2),
        lambda: boxes_to_masks(video, "gt", models[0], out_field="masks"),
        lambda: evaluate(video, "pred", "ev"),
    ):
        with pytest.raises(FiftyOneAdapterError) as error:
            call()
        assert str(error.value) == image_only
    grouped = (
        f"'{group.name}' is a grouped dataset: select one image slice first (e.g. view.select_group_slices('left'))"
    )
    for call in (
        lambda: count_references(group, "gt"),
        lambda: segment_by_reference(group, "bank", "pred", *models),
        lambda: evaluate(group, "pred", "ev"),
    ):
        with pytest.raises(FiftyOneAdapterError) as error:
            call()
        assert str(error.value) == grouped
    images, note = image_collection(group.select_group_slices("left"))
    assert len(images) == 1 and note == ""
    assert video.list_runs() == [] and group.list_runs() == []


def test_operator_forms_refuse_video_targets_where_only_images_work(media):
    """Boxes to masks is for images only; Segment by reference tracks videos (its form takes them);
    both refuse a grouped dataset until one slice is chosen."""
    video, group = media
    props = inputs_of("boxes_to_masks", video)
    assert props["target_problem"].invalid
    assert props["target_problem"].error_message == (
        "only image samples can be processed; this collection holds media of type 'video'"
    )
    segment = inputs_of("segment_by_reference", video)
    assert "target_problem" not in segment and "key_frame_stride" in segment
    for name in ("segment_by_reference", "boxes_to_masks"):
        assert inputs_of(name, group)["target_problem"].error_message.endswith(
            "select one image slice first (e.g. view.select_group_slices('left'))"
        )


# --- classes ---


def test_a_bank_for_classes_the_target_does_not_annotate(dataset, models, tmp_path):
    """Segmenting with it works (targets are usually unannotated); evaluating against ground truth
    that has none of its classes is refused instead of reporting an undefined AP of -1."""
    build_dataset_memory_bank(dataset, "bank", "gt", *models)
    classes = memory_bank_info(dataset, "bank")["classes"]
    folder = tmp_path / "other"
    folder.mkdir()
    other = scenes_dataset(folder, 2, (72, 88), 11)
    try:
        for sample in other.iter_samples(autosave=True):
            for label in sample.gt.detections:
                label.label = f"not a {label.label}"
        import_memory_bank(other, "bank", export_memory_bank(dataset, "bank", tmp_path / "exported"))
        gt_before = field_documents(other, "gt")
        report = segment_by_reference(other, "bank", "pred", *models, settings=SETTINGS)
        assert report["processed"] == 2 and report["failed"] == []
        assert set(other.distinct("pred.detections.label")) <= set(classes)
        with pytest.raises(FiftyOneAdapterError) as error:
            evaluate(other, "pred", "ev", gt_field="gt")
        assert str(error.value) == (
            f"none of the class(es) {', '.join(repr(c) for c in sorted(classes))} has ground truth in 'gt' among the "
            "evaluated samples: AP is undefined; evaluate against a field and samples that annotate them"
        )
        assert other.list_evaluations() == [] and field_documents(other, "gt") == gt_before
    finally:
        other.delete()


# --- fields ---


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "output field name '' is invalid: use letters, digits and underscores, starting with a letter"),
        (None, "output field name None is invalid"),
        ("1st", "output field name '1st' is invalid"),
        ("class", "output field name 'class' is invalid"),
        ("prédictions", "output field name 'prédictions' is invalid"),
        ("pred.detections", "output field name 'pred.detections' is invalid"),
        ("id", "output field name 'id' is reserved by FiftyOne"),
        ("tags", "output field name 'tags' is reserved by FiftyOne"),
        ("frames", "output field name 'frames' is reserved by FiftyOne"),
        ("created_at", "output field name 'created_at' is reserved by FiftyOne"),
        ("gt", "'gt' is a ground-truth field (a memory bank or an evaluation reads it): it is never written"),
        (
            "weather",
            "field 'weather' exists and holds Classification, not Detections: choose another name or delete it",
        ),
        ("count", "field 'count' exists and holds IntField, not Detections"),
    ],
)
def test_invalid_reserved_and_taken_output_fields(dataset, models, name, message):
    build_dataset_memory_bank(dataset, "bank", "gt", *models)
    sample = dataset.first()
    sample["weather"], sample["count"] = fo.Classification(label="sunny"), 3
    sample.save()
    fields = set(dataset.get_field_schema())
    with pytest.raises(FiftyOneAdapterError) as error:
        check_output_field(dataset, name, overwrite=True)
    assert str(error.value).startswith(message)
    with pytest.raises(FiftyOneAdapterError) as error:
        segment_by_reference(dataset, "bank", name, *models, overwrite=True)
    assert str(error.value).startswith(message)
    assert set(dataset.get_field_schema()) == fields and prediction_record(dataset, str(name)) is None


def test_fields_of_the_wrong_label_type_are_refused_as_inputs(dataset, models):
    build_dataset_memory_bank(dataset, "bank", "gt", *models)
    dataset.set_values("lines", [fo.Polylines() for _ in range(len(dataset))])
    with pytest.raises(FiftyOneAdapterError) as error:
        evaluate(dataset, "lines", "ev", gt_field="gt")
    assert str(error.value) == "prediction field 'lines' holds Polylines, not Detections (boxes/instance masks)"
    with pytest.raises(FiftyOneAdapterError) as error:
        boxes_to_masks(dataset, "lines", models[0], out_field="masks")
    assert str(error.value) == "input field 'lines' holds Polylines, not Detections (boxes/instance masks)"
    with pytest.raises(FiftyOneAdapterError) as error:
        evaluate(dataset, "gt", "ev", gt_field="nope")
    assert str(error.value) == "ground-truth field 'nope' does not exist; Detections fields: gt"


# --- parameters out of range ---


def test_counts_out_of_range_are_refused(dataset, models):
    build_dataset_memory_bank(dataset, "bank", "gt", *models)
    with pytest.raises(InputError, match=r"^batch_size must be at least 1, got 0$"):  # the forms' words
        segment_by_reference(dataset, "bank", "pred", *models, batch_size=0)
    with pytest.raises(InputError, match=r"^num_shards must be at least 1, got 0$"):
        start_sharded_prediction(dataset, "bank", "pred", *models, num_shards=0)
    with pytest.raises(InputError, match=r"^max_per_class must be at least 1, got 0$"):
        collect_references(dataset, "gt", max_per_class=0)
    assert not dataset.has_field("pred")


@pytest.fixture(scope="module")
def plugin_dataset(tiny_models, tmp_path_factory):
    """A dataset with a memory bank built by the operator from tiny models, for form checks."""
    dataset = scenes_dataset(tmp_path_factory.mktemp("plugin"), count=2, size=(64, 80))
    models = dict(sam2=str(tiny_models[0]), dinov2=str(tiny_models[1]), device="cpu")
    foo.get_operator(uri("build_memory_bank"))(dataset, "gt", **models)
    yield dataset, models
    dataset.delete()


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        (dict(score_threshold=-0.5), "Validation error. Path: score_threshold. Reason: Value must be greater than 0.0"),
        (dict(sam_iou_threshold=1.2), "Validation error. Path: sam_iou_threshold. Reason: Value must be less than 1.0"),
        (
            dict(max_detections=0),
            "Validation error. Path: max_detections. Reason: max_detections must be at least 1, got 0",
        ),
        (
            dict(points_per_side=0),
            "Validation error. Path: points_per_side. Reason: points_per_side must be at least 1, got 0",
        ),
        (dict(batch_size=0), "Validation error. Path: batch_size. Reason: batch_size must be at least 1, got 0"),
        (dict(num_shards=0), "Validation error. Path: num_shards. Reason: num_shards must be at least 1, got 0"),
        (dict(score_threshold=float("nan")), "Invalid settings: score_threshold=nan (must be in [0, 1])"),
    ],
)
def test_segmentation_parameters_out_of_range_write_nothing(plugin_dataset, params, reason):
    dataset, models = plugin_dataset
    fields, runs = set(dataset.get_field_schema()), dataset.list_runs()
    with pytest.raises(ExecutionError, match=re.escape(reason)):
        run(
            "segment_by_reference",
            dataset,
            dict(bank_key="references", pred_field="pred", **{**FAST, **params}, **models),
        )
    assert set(dataset.get_field_schema()) == fields and dataset.list_runs() == runs
