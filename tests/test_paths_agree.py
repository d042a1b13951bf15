"""Every path (CLI, Python API, operators, the FiftyOne-model route) protects ground truth the same
way and judges the same input with the same rule and the same one-line message."""

from __future__ import annotations

import json
import re

import fiftyone.operators as foo
import pytest
from fiftyone.operators.executor import ExecutionError
from fiftyone_scenes import field_documents
from test_cli import error_line, run
from test_cli import models as cli_models
from test_plugin import FAST, uri
from test_plugin import run as run_operator

from ntt_core.cli import main
from ntt_core.coco import load_coco, sample_references
from ntt_core.fiftyone.bank_runs import load_memory_bank, memory_bank_info
from ntt_core.fiftyone.building import build_dataset_memory_bank
from ntt_core.fiftyone.evaluation import evaluate
from ntt_core.fiftyone.fields import FiftyOneAdapterError
from ntt_core.fiftyone.labels import boxes_to_masks
from ntt_core.fiftyone.predictions import (
    apply_reference_model,
    prediction_record,
    segment_by_reference,
    start_sharded_prediction,
)
from ntt_core.fiftyone.references import collect_references
from ntt_core.fiftyone.review import add_to_memory_bank
from ntt_core.input_rules import CROWD_REASON, InputError
from ntt_core.memory_bank import MemoryBank, MemoryBankError
from ntt_core.models import load_encoder, load_models
from ntt_core.settings import Settings
from ntt_core.standins import ColourStatsEncoder, ConnectedRegionSegmenter
from ntt_core.synthetic import make_dataset

SETTINGS = Settings(points_per_side=12)


@pytest.fixture(scope="module")
def other_dinov2(tmp_path_factory):
    """A tiny DINOv2 with other weights than the session's (a bank built with one refuses the other)."""
    from tiny_models import save_tiny_models

    return save_tiny_models(tmp_path_factory.mktemp("other"), seed=1)[1]


# --- 1. ground truth ---


@pytest.mark.bad_input
def test_no_way_of_writing_predictions_modifies_ground_truth(dataset):
    models = ConnectedRegionSegmenter(), ColourStatsEncoder()
    build_dataset_memory_bank(dataset, "bank", "gt", *models)
    dataset.clone_sample_field("gt", "truth")  # a ground truth that only an evaluation names
    segment_by_reference(dataset, "bank", "pred", *models, settings=SETTINGS)
    evaluate(dataset, "pred", "eval_truth", gt_field="truth")
    snapshot = {field: field_documents(dataset, field) for field in ("gt", "truth")}
    runs = dataset.list_runs()
    for field in ("gt", "truth"):
        message = f"'{field}' is a ground-truth field (a memory bank or an evaluation reads it): it is never written"
        writers = (
            lambda f: segment_by_reference(dataset, "bank", f, *models, settings=SETTINGS, overwrite=True),
            lambda f: start_sharded_prediction(dataset, "bank", f, *models, 2, overwrite=True),
            lambda f: apply_reference_model(dataset, "bank", f, *models, settings=SETTINGS, overwrite=True),
            lambda f: boxes_to_masks(dataset, "pred", models[0], out_field=f, overwrite=True),
        )
        for write in writers:
            with pytest.raises(FiftyOneAdapterError, match=f"^{re.escape(message)}$"):
                write(field)
    assert {field: field_documents(dataset, field) for field in ("gt", "truth")} == snapshot
    assert dataset.list_runs() == runs

    # the review loop reads ground truth (adding its labels as shots) and writes nothing to it
    ids = [dataset.first().gt.detections[-1].id]
    add_to_memory_bank(dataset, "bank", {"gt": ids}, models[1])
    assert {field: field_documents(dataset, field) for field in ("gt", "truth")} == snapshot


@pytest.mark.bad_input
def test_a_field_not_written_by_us_is_never_overwritten(dataset):
    """Ground truth that no bank or evaluation names yet (a bank imported from a folder records no field)."""
    models = ConnectedRegionSegmenter(), ColourStatsEncoder()
    build_dataset_memory_bank(dataset, "bank", "gt", *models)
    dataset.clone_sample_field("gt", "labels")
    snapshot = field_documents(dataset, "labels")
    message = (
        "field 'labels' was not written by segment-by-reference (no run record): it may be ground truth, "
        "so it is never overwritten; choose another field"
    )
    writers = (
        lambda: segment_by_reference(dataset, "bank", "labels", *models, settings=SETTINGS, overwrite=True),
        lambda: start_sharded_prediction(dataset, "bank", "labels", *models, 2, overwrite=True),
        lambda: apply_reference_model(dataset, "bank", "labels", *models, settings=SETTINGS, overwrite=True),
    )
    for write in writers:
        with pytest.raises(FiftyOneAdapterError, match=f"^{re.escape(message)}$"):
            write()
    assert field_documents(dataset, "labels") == snapshot
    segment_by_reference(dataset, "bank", "pred", *models, settings=SETTINGS)
    segment_by_reference(dataset, "bank", "pred", *models, settings=SETTINGS, overwrite=True)  # ours: replaced


def test_apply_reference_model_writes_what_the_operator_path_writes(dataset):
    models = ConnectedRegionSegmenter(), ColourStatsEncoder()
    build_dataset_memory_bank(dataset, "bank", "gt", *models)
    segment_by_reference(dataset, "bank", "pred", *models, settings=SETTINGS)
    apply_reference_model(dataset, "bank", "applied", *models, settings=SETTINGS)
    for sample in dataset:
        ours = [(d.label, d.bounding_box, d.confidence) for d in sample.pred.detections]
        assert [(d.label, d.bounding_box, d.confidence) for d in sample.applied.detections] == ours
    assert prediction_record(dataset, "applied")["gt_field"] == "gt"  # evaluation finds its ground truth
    with pytest.raises(FiftyOneAdapterError, match="field 'applied' already exists"):
        apply_reference_model(dataset, "bank", "applied", *models, settings=SETTINGS)


@pytest.mark.bad_input
def test_the_operators_refuse_ground_truth_on_every_route(dataset, models):
    foo.get_operator(uri("build_memory_bank"))(dataset, "gt", **models)
    before = field_documents(dataset, "gt")
    for params in (dict(pred_field="gt"), dict(pred_field="gt", num_shards=2), dict(pred_field="gt", overwrite=True)):
        with pytest.raises(ExecutionError, match="Path: pred_field. Reason: 'gt' is a ground-truth field"):
            run_operator("segment_by_reference", dataset, dict(bank_key="references", **params, **FAST, **models))
    with pytest.raises(ExecutionError, match="Path: out_field. Reason: 'gt' is a ground-truth field"):
        run_operator("boxes_to_masks", dataset, dict(in_field="gt", out_field="gt", overwrite=True, **models))
    assert field_documents(dataset, "gt") == before
    dataset.clone_sample_field("gt", "labels")  # ground truth no bank or evaluation names: a form error too
    with pytest.raises(ExecutionError, match="Path: pred_field. Reason: field 'labels' was not written by segment-by"):
        params = dict(bank_key="references", pred_field="labels", overwrite=True, **FAST, **models)
        run_operator("segment_by_reference", dataset, params)
    assert field_documents(dataset, "labels") == field_documents(dataset, "gt")


# --- 4. one rule per input ---


@pytest.mark.bad_input
def test_crowd_references_are_skipped_with_the_same_reason_on_every_path(
    folder,
    dataset,
    tiny_models,
    tmp_path,
    capsys,
):
    first = dataset.first()
    crowd = first.gt.detections[0]
    crowd.tags, crowd["iscrowd"] = ["reference"], 1
    first.save()
    report = foo.get_operator(uri("build_memory_bank"))(
        dataset, "gt", sam2=str(tiny_models[0]), dinov2=str(tiny_models[1]), device="cpu"
    )["report"]
    assert {"reference_id": crowd.id, "class_name": crowd.label, "reason": CROWD_REASON} in report["skipped"]
    assert crowd.id not in load_memory_bank(dataset, "references").reference_ids

    argv = ["build-memory", "--references", folder / "annotations.json", "--images", folder / "images"]
    code, _, err = run(capsys, *argv, "--out", tmp_path / "bank", *cli_models(tiny_models), "--device", "cpu")
    assert code == 0 and f"ntt: warning: reference 300 (red) skipped: {CROWD_REASON}" in err
    assert "300" not in MemoryBank.load(tmp_path / "bank").reference_ids


@pytest.mark.bad_input
def test_negative_seeds_are_refused_everywhere_with_one_message(folder, capsys):
    message = "seed must be an integer of at least 0, got -5"
    for argv in (
        ["sample-references", "--annotations", folder / "annotations.json", "--shots", 1, "--seed", -5, "--out", "r"],
        ["demo", "--offline", "--seed", -5, "--no-app"],
    ):
        with pytest.raises(SystemExit) as exit_:
            main([str(a) for a in argv])
        assert exit_.value.code == 2 and f"argument --seed: {message}" in capsys.readouterr().err
    with pytest.raises(InputError, match=f"^{message}$"):
        sample_references(load_coco(folder / "annotations.json"), 1, -5, "all")
    with pytest.raises(InputError, match=f"^{message}$"):
        make_dataset(2, seed=-5)
    assert sample_references(load_coco(folder / "annotations.json"), 1, 0, "all")["annotations"]


@pytest.mark.bad_input
def test_counts_have_one_bound_and_one_wording_on_every_path(dataset, models, capsys):
    with pytest.raises(SystemExit):
        main(["sample-references", "--annotations", "a.json", "--shots", "0", "--seed", "1", "--out", "r.json"])
    assert "argument --shots: shots must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(InputError, match=r"^max_per_class must be at least 1, got 0$"):
        collect_references(dataset, "gt", max_per_class=0)
    with pytest.raises(ExecutionError, match=r"Path: max_per_class. Reason: max_per_class must be at least 1, got 0$"):
        run_operator("build_memory_bank", dataset, dict(gt_field="gt", max_per_class=0, **models))
    report = run_operator("build_memory_bank", dataset, dict(gt_field="gt", max_per_class=1, **models)).result
    assert set(report["report"]["counts"].values()) == {1}  # 1 is a valid number of shots
    for option in ("batch-size", "max-detections", "points-per-side"):  # the CLI's words are the forms' words
        name = option.replace("-", "_")
        with pytest.raises(SystemExit):
            main(["predict", "--memory", "b", "--images", "i", "--out", "r.json", f"--{option}", "0"])
        assert f"argument --{option}: {name} must be at least 1, got 0" in capsys.readouterr().err
        with pytest.raises(ExecutionError, match=f"Path: {name}. Reason: {name} must be at least 1, got 0$"):
            run_operator("segment_by_reference", dataset, dict(bank_key="references", **{**FAST, name: 0}, **models))


@pytest.mark.bad_input
def test_an_encoder_mismatch_is_the_same_one_line_from_the_cli_python_and_the_operators(
    folder,
    dataset,
    models,
    tiny_models,
    other_dinov2,
    tmp_path,
    capsys,
):
    other = {**models, "dinov2": str(other_dinov2)}
    foo.get_operator(uri("build_memory_bank"))(dataset, "gt", **models)
    with pytest.raises(MemoryBankError) as python_error:
        load_memory_bank(dataset, "references").check_encoder(load_encoder(str(other_dinov2), device="cpu"))
    message = str(python_error.value)
    assert "this memory bank was built with encoder" in message
    segment = foo.get_operator(uri("segment_by_reference"))
    with pytest.raises(ExecutionError) as operator_error:
        segment(dataset, "references", "pred", **FAST, **other)
    assert str(operator_error.value) == message  # one line, not FiftyOne's traceback

    argv = ["build-memory", "--references", folder / "annotations.json", "--images", folder / "images", "--shots", 1]
    assert run(capsys, *argv, "--out", tmp_path / "bank", *cli_models(tiny_models), "--device", "cpu")[0] == 0
    predict = ["predict", "--memory", tmp_path / "bank", "--images", folder / "images", "--out", tmp_path / "r.json"]
    code, _, err = run(capsys, *predict, "--sam2", models["sam2"], "--dinov2", other_dinov2, "--device", "cpu")
    expected = MemoryBank.load(tmp_path / "bank")
    with pytest.raises(MemoryBankError) as cli_expected:
        expected.check_encoder(load_encoder(str(other_dinov2), device="cpu"))
    assert code == 2 and error_line(err) == f"ntt: error: {' '.join(str(cli_expected.value).split())}"


# --- 5. no SAM2 when every reference has a mask ---


def test_banks_of_masked_references_are_built_without_loading_sam2(folder, dataset, models, tmp_path, capsys):
    nowhere = tmp_path / "no_sam2"  # a folder without weights: a valid choice that cannot load
    nowhere.mkdir()
    nowhere = str(nowhere)
    report = foo.get_operator(uri("build_memory_bank"))(dataset, "gt", **{**models, "sam2": nowhere})["report"]
    assert report["counts"] and not report["skipped"]
    assert memory_bank_info(dataset, "references")["segmenter_id"] == nowhere  # chosen, never loaded

    box_only = dataset.first()
    box_only.gt.detections[0].mask = None  # a reference label: it now needs SAM2's box prompt
    box_only.save()
    with pytest.raises(ExecutionError) as error:
        foo.get_operator(uri("build_memory_bank"))(dataset, "gt", bank_key="boxes", **{**models, "sam2": nowhere})
    assert str(error.value).startswith(f"SAM2 model '{nowhere}' could not be loaded")

    coco = json.loads((folder / "annotations.json").read_text())
    coco["annotations"] = [a for a in coco["annotations"] if a["category_id"] == 1]  # red: all polygons
    (tmp_path / "red.json").write_text(json.dumps(coco))
    argv = [
        "build-memory",
        "--references",
        tmp_path / "red.json",
        "--images",
        folder / "images",
        "--out",
        tmp_path / "b",
    ]
    code, out, _ = run(capsys, *argv, "--dinov2", models["dinov2"], "--sam2", nowhere, "--device", "cpu")
    assert code == 0 and "wrote a memory bank of 4 references (red: 4)" in out


def test_form_counts_accept_one(dataset, models):
    from test_plugin import inputs_of

    for params in (dict(max_per_class=1), dict(max_per_class=None)):
        props = inputs_of("build_memory_bank", dataset, dict(gt_field="gt", **params))
        assert not props["max_per_class"].invalid
    props = inputs_of("build_memory_bank", dataset, dict(gt_field="gt", max_per_class=-2))
    assert props["max_per_class"].error_message == "max_per_class must be at least 1, got -2"


def test_one_line_is_the_message_of_the_last_exception_of_a_traceback():
    from ntt_plugin.common import one_line

    traceback = (
        "Traceback (most recent call last):\n"
        '  File "a.py", line 1, in <module>\n'
        "    run()\n"
        "ntt_core.fiftyone.fields.FiftyOneAdapterError: field 'x' already exists\n"
    )
    assert one_line(traceback) == "field 'x' already exists"
    assert one_line("Traceback (most recent call last):\nKeyError: 'x'") == "'x'"  # no frame: still one line
    assert one_line("Value must be at least 1") == "Value must be at least 1"  # FiftyOne's own: kept


@pytest.mark.bad_input
def test_resuming_a_field_in_another_dtype_is_refused(dataset, models):
    float32 = load_models(models["sam2"], models["dinov2"], device="cpu", dtype="float32")
    bfloat16 = load_models(models["sam2"], models["dinov2"], device="cpu", dtype="bfloat16")
    build_dataset_memory_bank(dataset, "bank", "gt", *float32)
    segment_by_reference(dataset.limit(1), "bank", "pred", *float32, settings=Settings(**FAST))
    with pytest.raises(FiftyOneAdapterError, match="written with a different dtype: resuming would mix results"):
        segment_by_reference(dataset, "bank", "pred", *bfloat16, settings=Settings(**FAST), skip_existing=True)
    report = segment_by_reference(dataset, "bank", "pred", *float32, settings=Settings(**FAST), skip_existing=True)
    assert report["skipped_existing"] == 1 and report["processed"] == len(dataset) - 1
