"""The plugin's operators, run the ways FiftyOne runs them: ``execute_operator`` (immediate),
queued and then executed in-process by FiftyOne's delegated-operation service, and from Python
through each operator's ``__call__``; forms resolved headless. Tiny random-weight models from disk.
"""

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import fiftyone as fo
import fiftyone.operators as foo
import pytest
from fiftyone.operators.delegated import DelegatedOperationService
from fiftyone.operators.executor import (
    ExecutionContext,
    ExecutionError,
    ExecutionRunState,
    Executor,
    execute_or_delegate_operator,
    resolve_execution_options,
    resolve_type,
)
from fiftyone.operators.registry import OperatorRegistry
from fiftyone.operators.server import create_response_generator
from fiftyone_scenes import field_documents, scenes_dataset, without_eval_attributes

from ntt_core.errors import RunStopped
from ntt_core.fiftyone.bank_runs import memory_bank_info
from ntt_core.fiftyone.labels import PREDICTION_ATTRIBUTES
from ntt_core.settings import Settings
from ntt_plugin.common import PROGRESS_INTERVAL_S, one_line, run_with_progress

PLUGIN = "@ntt/no-time-to-train"
REPO = Path(__file__).resolve().parents[1]
FORM_SETTINGS = ("score_threshold", "points_per_side", "max_detections", "sam_iou_threshold")
FAST = dict(points_per_side=2, sam_iou_threshold=0.0, max_detections=5)  # 4 prompts per image


def uri(name: str) -> str:
    return f"{PLUGIN}/{name}"


@pytest.fixture(scope="module")
def segmented(models, tmp_path_factory):
    """A dataset with a memory bank and predictions, for tests that only read."""
    dataset = scenes_dataset(tmp_path_factory.mktemp("segmented"), count=3, size=(64, 80))
    foo.get_operator(uri("build_memory_bank"))(dataset, "gt", **models)
    foo.get_operator(uri("segment_by_reference"))(dataset, "references", "pred", **FAST, **models)
    yield dataset
    dataset.delete()


def run(name: str, dataset, params: dict, **ctx):
    return foo.execute_operator(uri(name), dict(dataset=dataset, **ctx), params=params)


def run_from_app(name: str, dataset, params: dict) -> list[tuple[str, dict]]:
    """Run ``name`` as the App does: the request body it posts to FiftyOne's generator endpoint, through
    the functions that endpoint calls; returns the streamed messages as (triggered operator, params)."""
    request = dict(operator_uri=uri(name), dataset_name=dataset.name, view=dataset.view()._serialize(), params=params)
    result = asyncio.run(execute_or_delegate_operator(uri(name), request))
    result.raise_exceptions()
    assert result.is_generator
    lines = [json.loads(line)["body"] for line in create_response_generator(result.result)]
    return [(line["operator_uri"], line["params"]) for line in lines]


def shown_error(messages) -> dict:
    """The Error view of the output that a failed App run shows."""
    (outputs,) = [params["outputs"] for name, params in messages if name == "show_output"]
    return outputs["type"]["properties"]["error"]["view"]


def run_queued(dataset) -> list:
    """Execute every queued operation of ``dataset`` in this process; fail on any failure."""
    results = DelegatedOperationService().execute_queued_operations(dataset_name=dataset.name)
    errors = [r.error for r in results if r.error]
    assert not errors, errors[0]
    return results


def inputs_of(name: str, collection, params: dict | None = None) -> dict:
    """The operator's form resolved as the App resolves it: {property name: property}."""
    request = dict(
        dataset_name=collection._root_dataset.name,
        view=collection.view()._serialize(),
        params=params or {},
        target="inputs",
    )
    prop = asyncio.run(resolve_type(OperatorRegistry(), uri(name), request))
    return prop.type.properties


def test_the_library_the_forms_use_imports_no_torch():
    """Forms resolve in the App server before any run: the FiftyOne side of the library they call must
    not bring torch in (a run imports it; the browser tests check the same in the App)."""
    code = (
        "import sys\nfrom ntt_core.fiftyone import bank_runs, evaluation, fields, labels, predictions, references, review\n"
        "print([m for m in ('torch', 'torchvision', 'transformers') if m in sys.modules])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, timeout=120, cwd=REPO
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_the_plugin_lists_without_importing_torch():
    code = (
        "import sys, fiftyone.operators as foo\n"
        f"names = sorted(o.name for o in foo.list_operators() if o.uri.startswith('{PLUGIN}/'))\n"
        "heavy = [m for m in ('torch', 'torchvision', 'transformers', 'timm', 'sam2') if m in sys.modules]\n"
        "print(names, heavy, 'ntt_core.fiftyone' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, timeout=120, cwd=REPO
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == (
        "['add_negative_references', 'add_to_memory_bank', 'boxes_to_masks', 'build_memory_bank', "
        "'clear_candidate_cache', 'delete_memory_bank', 'evaluate_by_reference', 'export_memory_bank', 'import_memory_bank', "
        "'memory_banks', "
        "'remove_from_memory_bank', 'segment_by_reference', 'show_matched_reference'] [] False"
    )
    listed = subprocess.run(
        [Path(sys.executable).parent / "fiftyone", "plugins", "list"],
        capture_output=True,
        text=True,
        env=os.environ,
        timeout=120,
    )
    assert PLUGIN in listed.stdout


def test_every_operator_label_starts_with_the_product_prefix():
    labels = [op.config.label for op in foo.list_operators() if op.uri.startswith(f"{PLUGIN}/")]
    labels = [label for label in labels if label != "Memory banks"]  # the panel, not in the operator browser
    assert len(labels) == 12 and all(label.startswith("NTT: ") for label in labels), labels


def test_fiftyone_finds_the_plugin_requirements():
    import fiftyone.plugins as fop
    from packaging.requirements import Requirement

    requirements = fop.load_plugin_requirements(PLUGIN)
    assert requirements is not None
    assert {"torch", "transformers", "fiftyone", "pycocotools"} <= {Requirement(line).name for line in requirements}
    fop.ensure_plugin_requirements(PLUGIN, error_level=0)  # raises if one is not satisfied here


def test_workflow_immediate_and_from_python(dataset, models, tmp_path):
    gt_before = field_documents(dataset, "gt")
    build = foo.get_operator(uri("build_memory_bank"))
    built = build(dataset, "gt", bank_key="refs", **models)
    report = built["report"]
    tagged = [d for s in dataset for d in s.gt.detections if "reference" in d.tags]
    assert report["counts"] == {d.label: 1 for d in tagged} and report["skipped"] == []
    rows = "\n".join(f"| {name} | 1 |" for name in sorted(report["counts"]))
    classes = len(report["counts"])
    assert built["summary"] == (
        f"Memory bank **refs**: {classes} reference(s) of {classes} class(es).\n\n| Class | Shots |\n|---|---|\n{rows}"
    )
    assert field_documents(dataset, "gt") == gt_before

    report = run("segment_by_reference", dataset, dict(bank_key="refs", pred_field="pred", **FAST, **models)).result[
        "report"
    ]
    assert report["processed"] == len(dataset) and report["failed"] == []
    assert all(isinstance(s.pred, fo.Detections) for s in dataset)
    assert dataset.count("pred.detections") == report["instances"]
    for det in dataset.values("pred.detections", unwind=True):
        assert det.mask is not None and det.reference_id in {d.id for d in tagged}
        assert {"sam_iou", "semantic_score", "merge_factor"} <= set(det.field_names)
    assert field_documents(dataset, "gt") == gt_before
    assert dataset.list_runs(method="ntt_predictions") == ["segmentation_pred"]  # a key that says what it is
    # the attributes are in the schema, which the App's sidebar offers as filters
    schema = dataset.get_field_schema(flat=True)
    assert {name: type(schema[f"pred.detections.{name}"]).__name__ for name in PREDICTION_ATTRIBUTES} == {
        "reference_id": "StringField",
        "sam_iou": "FloatField",
        "semantic_score": "FloatField",
        "merge_factor": "FloatField",
    }
    assert type(schema["pred.detections.confidence"]).__name__ == "FloatField"

    evaluate = foo.get_operator(uri("evaluate_by_reference"))
    evaluated = evaluate(dataset, "pred", eval_key="ev")
    report = evaluated["report"]
    segm = report["pycocotools"]["segm"]
    row = "| segm | " + " | ".join(
        "-" if segm[m] == -1 else f"{segm[m]:.3f}" for m in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR")
    )
    assert row + " |" in evaluated["summary"].splitlines()  # pycocotools' -1 (no object of that size) shows as "-"
    assert f"FiftyOne COCO mAP **{report['mAP']:.3f}**" in evaluated["summary"]
    assert "- " + report["notes"][0] in evaluated["summary"]
    assert report["gt_field"] == "gt" and "holding references excluded" in report["notes"][0]
    assert set(dataset.list_evaluations()) == {"ev"}
    results = dataset.load_evaluation_results("ev")
    assert results.custom_metrics["pycocotools_segm_AP"]["value"] == report["pycocotools"]["segm"]["AP"]
    assert without_eval_attributes(dataset, "gt", "ev") == gt_before
    dataset.delete_evaluation("ev")
    assert field_documents(dataset, "gt") == gt_before

    folder = tmp_path / "bank"
    foo.get_operator(uri("export_memory_bank"))(dataset, "refs", folder)
    other = fo.Dataset()
    try:
        report = foo.get_operator(uri("import_memory_bank"))(other, folder, bank_key="copied")["report"]
        assert report["counts"] == {d.label: 1 for d in tagged}
        props = inputs_of("import_memory_bank", other, {"directory": str(folder)})
        assert props["name"].view.label == "Imported as memory bank 'bank'"  # the exported folder's name
        assert foo.get_operator(uri("import_memory_bank"))(other, folder)["report"]["bank_key"] == "bank"
        assert sorted(other.list_runs(method="ntt_memory_bank")) == ["bank", "copied"]
    finally:
        other.delete()
    foo.get_operator(uri("delete_memory_bank"))(dataset, "refs")
    assert dataset.list_runs(method="ntt_memory_bank") == []
    assert field_documents(dataset, "gt") == gt_before


def test_delegated_runs_execute_in_the_delegated_service(dataset, models):
    gt_before = field_documents(dataset, "gt")
    queued = foo.execute_operator(
        uri("build_memory_bank"), dict(dataset=dataset), params=dict(gt_field="gt", **models), request_delegation=True
    )
    assert queued.delegated and dataset.list_runs() == []
    run_queued(dataset)
    assert dataset.list_runs(method="ntt_memory_bank") == ["references"]

    params = dict(bank_key="references", pred_field="pred", **FAST, **models)
    queued = foo.execute_operator(
        uri("segment_by_reference"), dict(dataset=dataset), params=params, request_delegation=True
    )
    assert queued.delegated and not dataset.has_field("pred")
    (result,) = run_queued(dataset)
    assert result.result["report"]["processed"] == len(dataset)
    assert len(dataset.exists("pred")) == len(dataset)
    operation = DelegatedOperationService().get(queued.result["id"])
    assert operation.run_state == ExecutionRunState.COMPLETED
    assert field_documents(dataset, "gt") == gt_before

    queued = foo.get_operator(uri("evaluate_by_reference"))(dataset, "pred", eval_key="ev", delegate=True)
    assert queued["run_state"] == ExecutionRunState.QUEUED and dataset.list_evaluations() == []
    (result,) = run_queued(dataset)
    assert result.result["report"]["eval_key"] == "ev" and dataset.list_evaluations() == ["ev"]
    assert without_eval_attributes(dataset, "gt", "ev") == gt_before


def execution_options(name: str, collection, params: dict) -> dict:
    request = dict(dataset_name=collection._root_dataset.name, view=collection.view()._serialize(), params=params)
    return asyncio.run(resolve_execution_options(OperatorRegistry(), uri(name), request)).to_dict()


def test_the_segment_form_says_what_will_run_how_long_it_takes_and_advises_schedule_when_long(dataset, models):
    from ntt_core.fiftyone.timings import record_timing, timing_key

    foo.get_operator(uri("build_memory_bank"))(dataset, "gt", **models)
    grid = 3  # a grid no other test runs: no figure is kept for it yet
    params = dict(bank_key="references", pred_field="pred", **{**FAST, "points_per_side": grid}, **models)
    props = inputs_of("segment_by_reference", dataset, params)
    held = len(set(dataset.values("id")) & set(memory_bank_info(dataset, "references")["reference_sample_ids"]))
    assert held == 2
    assert (
        props["plan"].view.label
        == "Segments 3 sample(s); the 2 sample(s) holding the bank's references are among them."
    )
    assert props["estimate"].view.label.startswith("No time measured yet on 'cpu' for these models and grid")
    assert "schedule_advice" not in props  # the tiny models: not the paper's
    assert execution_options("segment_by_reference", dataset, params)["default_choice_to_delegated"] is False
    paper = {**params, "sam2": "", "dinov2": ""}  # the paper's models on a CPU, no figure yet: schedule
    assert "Schedule is pre-selected" in inputs_of("segment_by_reference", dataset, paper)["schedule_advice"].view.label
    options = execution_options("segment_by_reference", dataset, paper)
    assert options["default_choice_to_delegated"] is True and options["allow_immediate_execution"] is True

    left_out = {**params, "skip_reference_samples": True}
    plan = inputs_of("segment_by_reference", dataset, left_out)["plan"].view.label
    assert plan == "Segments 1 sample(s); the 2 sample(s) holding the bank's references are left out."
    report = foo.get_operator(uri("segment_by_reference"))(dataset, skip_reference_samples=True, **params)["report"]
    assert report["processed"] == 1 and len(dataset.exists("pred")) == 1

    estimate = inputs_of("segment_by_reference", dataset, {**params, "pred_field": "other"})["estimate"].view.label
    assert re.fullmatch(
        r"About \d+ s on 'cpu' for 3 image\(s\) \([\d.]+ s per image measured on this machine .*", estimate
    )
    key = timing_key("cpu", models["sam2"], models["dinov2"], grid)
    record_timing(key, 50 * 1000.0, 50)  # a slow machine's figure: 1000 s per image
    slow = {**params, "pred_field": "other"}
    assert "About 50 min on 'cpu'" in inputs_of("segment_by_reference", dataset, slow)["estimate"].view.label
    assert execution_options("segment_by_reference", dataset, slow)["default_choice_to_delegated"] is True


def test_a_bfloat16_run_keeps_a_figure_of_its_own_and_the_estimate_names_its_dtype(dataset, models):
    """bfloat16 runs faster than the default float32, so its seconds per image are kept apart ("auto" is
    float32 and shares float32's figure), and an estimate from them says so."""
    from ntt_core.fiftyone.timings import seconds_per_image, timing_key

    foo.get_operator(uri("build_memory_bank"))(dataset, "gt", **models)
    grid = 7  # a grid no other test runs: no figure is kept for it yet
    params = dict(bank_key="references", pred_field="pred", **{**FAST, "points_per_side": grid}, **models)
    fp32, bf16 = (timing_key("cpu", models["sam2"], models["dinov2"], grid, dtype) for dtype in ("auto", "bfloat16"))
    assert fp32 == timing_key("cpu", models["sam2"], models["dinov2"], grid, "float32") != bf16
    foo.get_operator(uri("segment_by_reference"))(dataset, dtype="bfloat16", **params)
    assert seconds_per_image(bf16) is not None and seconds_per_image(fp32) is None
    line = inputs_of("segment_by_reference", dataset, {**params, "pred_field": "other", "dtype": "bfloat16"})
    assert re.fullmatch(
        r"About \d+ s on 'cpu' in bfloat16 for 3 image\(s\) \([\d.]+ s per image .*", line["estimate"].view.label
    )
    line = inputs_of("segment_by_reference", dataset, {**params, "pred_field": "other", "dtype": "float32"})
    assert line["estimate"].view.label.startswith("No time measured yet on 'cpu' for these models and grid")


def test_the_build_form_estimates_its_time_per_reference_image_from_the_kept_figure(dataset, models):
    from fiftyone import ViewField as F
    from fiftyone.operators.store import ExecutionStore

    from ntt_core.fiftyone.references import DEFAULT_REFERENCE_TAG
    from ntt_core.fiftyone.timings import BUILD, STORE, seconds_per_image, timing_key

    key = timing_key("cpu", models["sam2"], models["dinov2"], BUILD)
    ExecutionStore.create(STORE).delete(key)  # other tests build with these models too
    params = dict(gt_field="gt", **models)
    assert inputs_of("build_memory_bank", dataset, params)["estimate"].view.label == (
        "No time measured yet on 'cpu' for these models on this machine: this run measures its first "
        "reference image (the figure is kept for the next estimates)."
    )
    foo.get_operator(uri("build_memory_bank"))(dataset, "gt", **models)
    assert seconds_per_image(key) is not None  # the run measured it
    images = len(dataset.filter_labels("gt", F("tags").contains(DEFAULT_REFERENCE_TAG)))
    assert images == 2
    estimate = inputs_of("build_memory_bank", dataset, {**params, "bank_key": "other"})["estimate"].view.label
    assert re.fullmatch(
        r"About \d+ s on 'cpu' for 2 reference image\(s\) \([\d.]+ s per reference image measured on this "
        r"machine with these models\), plus loading the models\.",
        estimate,
    ), estimate
    ExecutionStore.create(STORE).set(key, {"seconds_per_image": 90.0, "images": 50})  # a slow machine's figure
    slow = inputs_of("build_memory_bank", dataset, {**params, "bank_key": "other", "max_per_class": 1})
    assert slow["estimate"].view.label.startswith("About 3 min on 'cpu' for 2 reference image(s) (90.0 s per")
    ExecutionStore.create(STORE).delete(timing_key("auto", models["sam2"], models["dinov2"], BUILD))
    other_device = inputs_of("build_memory_bank", dataset, {**params, "device": "auto"})["estimate"].view.label
    assert other_device.startswith("No time measured yet on 'auto'")  # a figure is per device


def test_a_kept_timing_is_the_mean_of_the_last_50_images_and_a_corrupt_one_is_measured_again():
    from fiftyone.operators.store import ExecutionStore

    from ntt_core.fiftyone.timings import STORE, record_timing, seconds_per_image

    key = "test-host|cpu|a|b|7"
    ExecutionStore.create(STORE).delete(key)
    assert seconds_per_image(key) is None
    record_timing(key, 10.0, 1)
    record_timing(key, 3 * 4.0, 3)
    assert seconds_per_image(key) == pytest.approx((10.0 + 12.0) / 4)
    record_timing(key, 60 * 2.0, 60)  # more than 50 images: the older ones no longer count
    assert seconds_per_image(key) == pytest.approx(2.0)
    record_timing(key, 1 * 52.0, 1)  # 49 images of 2 s and this one
    assert seconds_per_image(key) == pytest.approx((49 * 2.0 + 52.0) / 50)
    for corrupt in (
        "fast",
        {"seconds_per_image": "nan", "images": 3},
        {"images": 3},
        {"seconds_per_image": -1, "images": 1},
    ):
        ExecutionStore.create(STORE).set(key, corrupt)
        assert seconds_per_image(key) is None  # the form says no figure exists
        record_timing(key, 5.0, 1)  # the run measures again instead of failing
        assert seconds_per_image(key) == pytest.approx(5.0)


def test_a_delegated_run_asked_to_stop_stops_after_its_image_and_keeps_what_it_wrote(dataset, models):
    from ntt_core.fiftyone.stops import request_stop

    foo.get_operator(uri("build_memory_bank"))(dataset, "gt", **models)
    params = dict(bank_key="references", pred_field="pred", **FAST, **models)
    queued = foo.execute_operator(
        uri("segment_by_reference"), dict(dataset=dataset), params=params, request_delegation=True
    )
    request_stop(dataset, str(queued.result["id"]))  # what the panel's stop button does
    (result,) = DelegatedOperationService().execute_queued_operations(dataset_name=dataset.name)
    assert one_line(result.error) == (
        "stopped from the Memory banks panel: stopped after 1 of 3 samples; the finished samples are saved in "
        "'pred'. To resume, run Segment by reference into 'pred' again with skip_existing "
        "('Skip samples that already have predictions')"
    )
    assert len(dataset.exists("pred")) == 1  # the image it was on is written, nothing after it
    resumed = foo.get_operator(uri("segment_by_reference"))(dataset, skip_existing=True, **params)["report"]
    assert resumed["processed"] == 2 and resumed["skipped_existing"] == 1


def test_an_app_run_nobody_reads_any_more_stops_at_its_next_prompt_batch(dataset, models):
    """The page went away (or the server is stopping): FiftyOne closes the message generator; the
    segmentation ends at its next prompt batch, writing nothing of the image it was on."""
    import ntt_plugin.common

    foo.get_operator(uri("build_memory_bank"))(dataset, "gt", **models)
    operator = foo.get_operator(uri("segment_by_reference"))
    params = dict(bank_key="references", pred_field="pred", **FAST, **models)
    ctx = ExecutionContext(
        dict(operator_uri=operator.uri, dataset_name=dataset.name, view=dataset.view()._serialize(), params=params),
        Executor(),
    )
    reports, entered = [], __import__("threading").Event()

    def work(progress):
        try:
            return operator._run(ctx, ntt_plugin.common.params_with_defaults(operator, ctx), slow_after_first(progress))
        except BaseException as error:
            reports.append(error)
            raise

    def slow_after_first(progress):
        def watched(done, total, detail=""):
            if done == 1 and detail:  # image 2: let the reader go away, then continue
                entered.set()
                time.sleep(0.5)
            progress(done, total, detail)

        return watched

    messages = run_with_progress(operator, ctx, "Images", work)
    next(messages)  # "Loading the models"
    while not entered.is_set():
        next(messages)
    messages.close()  # what FiftyOne does when the request goes away
    deadline = time.monotonic() + 60
    while not reports and time.monotonic() < deadline:
        time.sleep(0.1)
    (error,) = reports
    assert str(error).startswith(
        "the App's request went away (page closed or reloaded, or the server is stopping): stopped after 1 of 3 samples"
    )
    assert len(dataset.exists("pred")) == 1


def test_an_app_run_whose_messages_nobody_asks_for_stops_at_its_next_progress(dataset, monkeypatch):
    """The server stopped reading the messages without closing the generator (a request cancelled
    mid-stream): the run stops at its first progress once GONE_AFTER_S passed without a read."""
    import ntt_plugin.common

    monkeypatch.setattr(ntt_plugin.common, "GONE_AFTER_S", 0.5)
    operator = foo.get_operator(uri("segment_by_reference"))
    ctx = ExecutionContext(dict(operator_uri=operator.uri, dataset_name=dataset.name, params={}), Executor())
    steps, errors = [], []

    def work(progress):
        try:
            for done in range(500):
                time.sleep(0.01)
                progress(done, 500, detail=f"step {done}")
                steps.append(done)
        except RunStopped as error:
            errors.append(error)
            raise

    messages = run_with_progress(operator, ctx, "Images", work)
    next(messages)  # "Loading the models", then nobody asks again (the generator stays open)
    deadline = time.monotonic() + 30
    while not errors and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [str(e) for e in errors] == [
        "the App's request went away (page closed or reloaded, or the server is stopping)"
    ]
    assert 10 < len(steps) < 500  # it ran while read recently, then stopped long before its end


def test_sharded_run_queues_fixed_shards_that_label_each_sample_once(dataset, models, tmp_path):
    more = scenes_dataset(tmp_path, count=5, size=(64, 80), seed=9)
    dataset.add_samples(more)
    more.delete()
    foo.get_operator(uri("build_memory_bank"))(dataset, "gt", **models)
    op = foo.get_operator(uri("segment_by_reference"))
    report = op(dataset, "references", "pred", num_shards=3, **FAST, **models)["report"]
    shards = report["shards"]
    assert [s["shard"] for s in shards] == ["1/3", "2/3", "3/3"] and sum(s["samples"] for s in shards) == len(dataset)
    assert dataset.has_field("pred") and len(dataset.exists("pred")) == 0  # created before any shard runs
    queued = DelegatedOperationService().get_queued_operations(dataset_name=dataset.name)
    assert sorted(str(o.id) for o in queued) == sorted(s["operation_id"] for s in shards)
    ids = [o.context.request_params["params"]["shard_sample_ids"] for o in queued]
    assert sorted(i for part in ids for i in part) == sorted(dataset.values("id"))  # disjoint, complete

    results = run_queued(dataset)
    processed = [r.result["report"]["processed"] for r in results]
    assert sorted(processed) == sorted(s["samples"] for s in shards)  # each sample written by exactly one shard
    assert len(dataset.exists("pred")) == len(dataset)


def test_an_app_run_streams_its_progress_then_its_report_and_a_reload(dataset, models, tmp_path, monkeypatch):
    monkeypatch.setenv("NTT_CACHE_DIR", str(tmp_path / "cache"))  # an empty candidate cache: every stage runs
    foo.get_operator(uri("build_memory_bank"))(dataset, "gt", **models)
    params = dict(bank_key="references", pred_field="pred", **FAST, **models)
    messages = run_from_app("segment_by_reference", dataset, params)
    names = [name for name, _ in messages]
    assert names[0] == "set_progress" and names[-2:] == ["show_output", "reload_dataset"]
    assert set(names[1:-2]) == {"set_progress"}
    steps = [params for _, params in messages[1:-2]]
    values = [step["progress"] for step in steps]
    assert values and values == sorted(values) and values[-1] == 1.0  # never backwards
    labels = [step["label"] for step in steps]  # what is happening now, at every stage of each image
    assert labels[0] == "image 1 of 3: image encoders" and labels[-1] == "Images: 3/3", labels
    assert {re.sub(r"\d+", "N", label) for label in labels} <= {
        "image N of N: image encoders",
        "image N of N: prompts N/N",
        "image N of N: post-processing",
        "image N of N: writing",
        "Images: N/N",
    }, labels
    output = messages[-2][1]
    shown = output["outputs"]["type"]["properties"]  # as resolve_output shows it: the summary, as Markdown
    assert list(shown) == ["summary"] and shown["summary"]["view"]["name"] == "MarkdownView"
    report = output["results"]["report"]
    assert report["processed"] == len(dataset) and dataset.count("pred.detections") == report["instances"]
    assert output["results"]["summary"] == f"**pred**: {report['instances']} instance(s) in 3 sample(s)."


def test_app_progress_is_throttled_and_a_failure_mid_run_is_shown_with_its_message(dataset):
    operator = foo.get_operator(uri("segment_by_reference"))
    ctx = ExecutionContext(dict(operator_uri=operator.uri, dataset_name=dataset.name, params={}), Executor())
    steps = 40

    def work(progress):
        for done in range(1, steps + 1):
            time.sleep(0.02)
            progress(done, 100)
        raise RuntimeError("CUDA out of memory (simulated)")

    started = time.monotonic()
    messages = [(m.body.operator_uri, m.body.params) for m in run_with_progress(operator, ctx, "Images", work)]
    elapsed = time.monotonic() - started
    progress = [params for name, params in messages[1:] if name == "set_progress"]
    assert [p["progress"] for p in progress] == sorted({p["progress"] for p in progress})
    assert 2 <= len(progress) <= elapsed / PROGRESS_INTERVAL_S + 2 and len(progress) < steps
    assert progress[-1] == {"label": f"Images: {steps}/100", "progress": steps / 100}
    assert [name for name, _ in messages[-2:]] == ["show_output", "reload_dataset"]
    error = shown_error(messages)
    assert (error["label"], error["description"]) == ("Segment by reference failed", "CUDA out of memory (simulated)")


def test_progress_outside_the_app_sends_stages_at_most_every_interval_and_every_finished_item(dataset):
    """Each progress of a delegated run is a database write: a stage's are throttled, never an item's."""
    operator = foo.get_operator(uri("segment_by_reference"))
    sent = []

    class Recorded(ExecutionContext):
        def set_progress(self, progress=None, label=None):
            sent.append(label)

    ctx = Recorded(dict(dataset_name=dataset.name, params={}), Executor())
    stages = 40

    def work(progress):
        for done in range(2):
            for prompt in range(stages):
                progress(done, 2, detail=f"image {done + 1} of 2: prompts {prompt}/{stages}")
            progress(done + 1, 2)
        return {"field": "pred", "processed": 2, "instances": 0, "skipped_existing": 0, "failed": [], "note": ""}

    run_with_progress(operator, ctx, "Images", work)
    assert [label for label in sent if label.startswith("Images")] == ["Images: 1/2", "Images: 2/2"]
    assert 1 <= len(sent) - 2 < stages  # the first stage of a run is sent, most of a quick burst is not


def test_a_failed_app_run_shows_its_error_and_python_callers_get_it_raised(segmented, models, tmp_path):
    params = dict(bank_key="references", pred_field="never", **FAST, **{**models, "sam2": str(tmp_path / "no-sam2")})
    messages = run_from_app("segment_by_reference", segmented, params)
    assert [name for name, _ in messages] == ["set_progress", "show_output", "reload_dataset"]
    error = shown_error(messages)
    assert error["label"] == "Segment by reference failed"
    assert re.match(r"SAM2 model '.*no-sam2' could not be loaded", error["description"])
    with pytest.raises(ExecutionError, match=r"SAM2 model '.*no-sam2' could not be loaded"):
        run("segment_by_reference", segmented, params)
    assert not segmented.has_field("never")


@pytest.mark.bad_input
def test_a_checkpoint_that_does_not_fill_the_model_is_refused_in_the_app_and_from_python(dataset, models, tmp_path):
    from tiny_models import renamed_layer, tampered

    broken = str(tampered(Path(models["dinov2"]), tmp_path / "dinov2", renamed_layer))
    params = dict(gt_field="gt", bank_key="broken", **{**models, "dinov2": broken})
    error = shown_error(run_from_app("build_memory_bank", dataset, params))
    assert error["description"].startswith(f"{broken} does not fit Dinov2Model: tensors ")
    assert "\n" not in error["description"] and "missing (encoder.layer.1." in error["description"]
    with pytest.raises(ExecutionError, match=re.escape(f"{broken} does not fit Dinov2Model")):
        run("build_memory_bank", dataset, params)
    assert "broken" not in dataset.list_runs()


def test_boxes_to_masks_operator(dataset, models):
    boxes = [
        fo.Detections(detections=[fo.Detection(label=d.label, bounding_box=d.bounding_box) for d in s.gt.detections])
        for s in dataset
    ]
    dataset.set_values("boxes", boxes)
    gt_before = field_documents(dataset, "gt")
    report = foo.get_operator(uri("boxes_to_masks"))(dataset, "boxes", "boxes_sam2", sam2=models["sam2"], device="cpu")[
        "report"
    ]
    filled = [d for d in dataset.values("boxes_sam2.detections", unwind=True) if d.mask is not None]
    assert report["filled"] + len(report["failed"]) == dataset.count("boxes.detections")
    assert len(filled) == report["filled"] > 0
    assert all(d.mask is None for d in dataset.values("boxes.detections", unwind=True))
    assert field_documents(dataset, "gt") == gt_before

    queued = foo.execute_operator(
        uri("boxes_to_masks"),
        dict(dataset=dataset),
        params=dict(in_field="boxes", in_place=True, **models),
        request_delegation=True,
    )
    assert queued.delegated
    run_queued(dataset)
    assert dataset.count("boxes.detections") == len(
        [d for d in dataset.values("boxes.detections", unwind=True) if d.mask is not None]
    ) + len(report["failed"])


def test_forms_resolve_with_paper_defaults(dataset, models):
    props = inputs_of("segment_by_reference", dataset)
    defaults = {name: prop.default for name, prop in props.items()}
    assert (
        defaults["score_threshold"] == 0.0 and defaults["points_per_side"] == 32 and defaults["max_detections"] == 100
    )
    assert defaults["sam_iou_threshold"] == 0.4 and defaults["sam2"] == "" and defaults["dinov2"] == ""
    paper = Settings()  # the form reads its defaults from the library's settings
    assert {n: defaults[n] for n in FORM_SETTINGS} == {n: getattr(paper, n) for n in FORM_SETTINGS}
    assert (
        props["bank_key"].invalid and "no memory bank: run 'Build memory bank' first" in props["bank_key"].error_message
    )

    props = inputs_of("build_memory_bank", dataset)
    assert props["gt_field"].default == "gt" and props["tag"].default == "reference"
    assert "References found per class" in props["found"].view.label
    assert not any(p.invalid for p in props.values())


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "build_memory_bank",
            {"gt_field": "gt", "reference_mode": "label_tag", "tag": "reference", "overwrite": False},
        ),
        ("segment_by_reference", {"bank_key": "references", "pred_field": "ntt_predictions", "num_shards": 1}),
        ("boxes_to_masks", {"in_field": "gt", "in_place": False, "out_field": "gt_masks"}),
        (
            "evaluate_by_reference",
            {"pred_field": "pred", "gt_field": "gt", "eval_key": "eval_ntt", "exclude_references": True},
        ),
        ("export_memory_bank", {"bank_key": "references"}),
        ("import_memory_bank", {"bank_key": "", "overwrite": False}),  # empty: the folder's name
        ("delete_memory_bank", {"bank_key": "references"}),
    ],
)
def test_every_form_resolves_headless_with_defaults(segmented, name, expected):
    props = inputs_of(name, segmented)
    assert {key: props[key].default for key in expected} == expected
    invalid = {key: prop.error_message for key, prop in props.items() if prop.invalid}
    if name == "build_memory_bank":  # the default name is taken by the bank built above
        assert invalid == {
            "bank_key": "memory bank 'references' already exists: choose another name or allow overwriting it"
        }
    else:
        assert invalid == {}


def test_selected_labels_are_references(dataset, models):
    chosen = [d for d in dataset.first().gt.detections[:2]]
    selected = [
        {"label_id": d.id, "sample_id": dataset.first().id, "field": "gt", "frame_number": None} for d in chosen
    ]
    result = run(
        "build_memory_bank",
        dataset,
        dict(gt_field="gt", reference_mode="label_ids", **models),
        selected_labels=selected,
    )
    bank = result.result["report"]
    assert sum(bank["counts"].values()) == 2 and set(bank["counts"]) == {d.label for d in chosen}


BAD_PARAMS = [
    (
        "build_memory_bank",
        dict(gt_field="gt", tag="nothing"),
        "tag",
        "no reference found: no label of 'gt' is tagged 'nothing'",
    ),
    ("build_memory_bank", dict(gt_field="gt", bank_key="my bank"), "bank_key", "memory bank name 'my bank' is invalid"),
    (
        "build_memory_bank",
        dict(gt_field="gt", classes=["unicorn"]),
        "classes",  # under the field it is about
        "no reference found: no label of 'gt' is tagged 'reference' among classes 'unicorn'",
    ),
    (
        "build_memory_bank",
        dict(gt_field="gt", max_per_class=0),
        "max_per_class",
        "max_per_class must be at least 1, got 0",
    ),
    (
        "segment_by_reference",
        dict(bank_key="references", pred_field="gt"),
        "pred_field",
        "'gt' is a ground-truth field",
    ),
    (
        "segment_by_reference",
        dict(bank_key="references", pred_field="filepath"),
        "pred_field",
        "output field name 'filepath' is reserved",
    ),
    ("segment_by_reference", dict(bank_key="references", pred_field="old"), "pred_field", "field 'old' already exists"),
    (
        "segment_by_reference",
        dict(bank_key="references", score_threshold=1.5),
        "score_threshold",
        "Value must be less than 1",
    ),
    ("segment_by_reference", dict(bank_key="nope"), "bank_key", "Invalid enum value"),
    (
        "evaluate_by_reference",
        dict(pred_field="old", eval_key="bad-key"),
        "eval_key",
        "evaluation key 'bad-key' is invalid",
    ),
    (
        "boxes_to_masks",
        dict(in_field="gt", in_place=True),
        "in_place",  # the library's check (labels.check_in_place), under its own field
        "'gt' is a ground-truth field: write the masks to a new field instead",
    ),
    (
        "import_memory_bank",
        dict(directory="/nowhere", bank_key="references"),
        "bank_key",
        "memory bank 'references' already exists",
    ),
]


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("name", "params", "path", "reason"), BAD_PARAMS, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_PARAMS)]
)
def test_bad_params_are_form_errors_and_change_nothing(dataset, models, name, params, path, reason):
    foo.get_operator(uri("build_memory_bank"))(dataset, "gt", **models)
    dataset.set_values("old", [fo.Detections() for _ in range(len(dataset))])
    gt_before, fields, runs = field_documents(dataset, "gt"), set(dataset.get_field_schema()), dataset.list_runs()
    with pytest.raises(ExecutionError, match=re.escape(f"Validation error. Path: {path}. Reason: {reason}")):
        run(name, dataset, {**params, **models})
    assert field_documents(dataset, "gt") == gt_before
    assert set(dataset.get_field_schema()) == fields and dataset.list_runs() == runs


@pytest.mark.bad_input
def test_empty_target_and_missing_library_are_form_errors(dataset, monkeypatch):
    props = inputs_of("boxes_to_masks", dataset.match_tags("no-such-tag"))
    assert props["target_problem"].invalid
    assert props["target_problem"].error_message == "the target view is empty: nothing to process"

    for name in [m for m in sys.modules if m == "ntt_core" or m.startswith("ntt_core.")]:
        monkeypatch.setitem(sys.modules, name, None)
    props = inputs_of("segment_by_reference", dataset)
    assert props["library_missing"].invalid
    assert "the ntt_core library is not importable" in props["library_missing"].error_message
    assert "pip install" in props["library_missing"].error_message


def test_ground_truth_changes_only_by_evaluation_attributes_after_every_operator(dataset, models, tmp_path):
    """Every operator, including sharded runs, re-evaluation under the same key and overwriting an
    evaluated prediction field: ground truth only ever gains ``<eval_key>`` attributes, and deleting
    the evaluations restores it byte for byte."""
    sample = dataset.last()
    sample.gt.detections[-1].mask = None  # a box-only label, for boxes to masks to fill
    sample.save()
    before = field_documents(dataset, "gt")
    op = {name: foo.get_operator(uri(name)) for name in ("build_memory_bank", "segment_by_reference")}
    evaluate = foo.get_operator(uri("evaluate_by_reference"))

    def prediction_ids():
        return [i for ids in dataset.values("pred.detections.id") for i in ids or []]

    def review(name, *args, **kwargs):
        return foo.get_operator(uri(name))(dataset, "references", *args, **kwargs)

    steps = [
        ("build", lambda: op["build_memory_bank"](dataset, "gt", **models)),
        (
            "boxes to masks",
            lambda: foo.get_operator(uri("boxes_to_masks"))(
                dataset, "gt", "gt_sam2", sam2=models["sam2"], device="cpu"
            ),
        ),
        ("segment", lambda: op["segment_by_reference"](dataset, "references", "pred", **FAST, **models)),
        ("shards", lambda: op["segment_by_reference"](dataset, "references", "pred2", num_shards=2, **FAST, **models)),
        ("run shards", lambda: run_queued(dataset)),
        ("evaluate", lambda: evaluate(dataset, "pred", eval_key="ev")),
        ("re-evaluate", lambda: evaluate(dataset, "pred2", eval_key="ev", overwrite=True)),
        ("second key", lambda: evaluate(dataset, "pred", eval_key="ev_b")),
        (
            "overwrite",
            lambda: op["segment_by_reference"](dataset, "references", "pred", overwrite=True, **FAST, **models),
        ),
        ("export", lambda: foo.get_operator(uri("export_memory_bank"))(dataset, "references", tmp_path / "bank")),
        ("import", lambda: foo.get_operator(uri("import_memory_bank"))(dataset, tmp_path / "bank", bank_key="copy")),
        ("delete bank", lambda: foo.get_operator(uri("delete_memory_bank"))(dataset, "copy")),
        ("accept predictions", lambda: review("add_to_memory_bank", "pred", label_ids=prediction_ids()[:1])),
        ("tag negatives", lambda: dataset.select_labels(ids=prediction_ids()[1:2]).tag_labels("not_this_class")),
        ("add negatives", lambda: review("add_negative_references")),
        ("tag removal", lambda: dataset.select_labels(ids=prediction_ids()[:1]).tag_labels("remove_reference")),
        ("remove references", lambda: review("remove_from_memory_bank")),
    ]
    for name, step in steps:
        step()
        assert without_eval_attributes(dataset, "gt", "ev") == before, name  # strips "ev" and "ev_b" attributes
    assert dataset.list_evaluations() == ["ev"]  # overwriting 'pred' dropped 'ev_b', which described it
    assert dataset.count("gt.detections.ev") > 0  # the evaluation did annotate the ground truth
    dataset.delete_evaluation("ev")
    assert field_documents(dataset, "gt") == before


@pytest.mark.bad_input
def test_a_resume_with_other_settings_is_refused_in_the_form_naming_each_setting(segmented, models):
    params = dict(bank_key="references", pred_field="pred", skip_existing=True, **models)
    props = inputs_of("segment_by_reference", segmented, {**params, **FAST, "points_per_side": 3, "max_detections": 7})
    assert props["skip_existing"].invalid
    assert props["skip_existing"].error_message == (
        "field 'pred' was written with a different settings: resuming would mix results (max_detections: 5 in the "
        "field, 7 now; points_per_side: 2 in the field, 3 now); use the same bank, models and settings, overwrite "
        "the field, or choose another field"
    )
    assert not inputs_of("segment_by_reference", segmented, {**params, **FAST})["skip_existing"].invalid


def test_the_build_form_ignores_empty_class_rows_and_shows_counts_after_the_choices(dataset):
    props = inputs_of("build_memory_bank", dataset, {"classes": ["", "  "]})  # the App's "Add" makes empty rows
    assert not any(p.invalid for p in props.values())
    names = list(props)
    assert names.index("found") == names.index("classes") + 1  # right after the field, tag and class choices
    everything = inputs_of("build_memory_bank", dataset)["found"].view.label
    assert props["found"].view.label == everything

    props = inputs_of("build_memory_bank", dataset, {"classes": ["nope"]})
    assert props["classes"].invalid and not props["tag"].invalid  # the error under the field it is about
    assert (
        props["classes"].error_message
        == "no reference found: no label of 'gt' is tagged 'reference' among classes 'nope'"
    )


@pytest.mark.bad_input
def test_the_offline_stand_in_models_are_refused_plainly_in_the_forms(segmented, models):
    """A bank of `ntt demo --offline` names stand-ins that no model loader can load: the forms say so
    (the panel pre-fills the bank's models, so Preview and Segment show it)."""
    message = (
        "'standin:connected-regions' is an offline stand-in model of `ntt demo --offline`: it cannot be loaded "
        "here, so banks built with it cannot segment from the App; give a SAM2 checkpoint (hub id, short name or "
        "local folder) and a bank built with it"
    )
    params = dict(
        bank_key="references", pred_field="new", sam2="standin:connected-regions", dinov2="standin:colour-stats"
    )
    props = inputs_of("segment_by_reference", segmented, params)
    assert (props["sam2"].invalid, props["sam2"].error_message) == (True, message)
    assert props["dinov2"].error_message.startswith("'standin:colour-stats' is an offline stand-in model")
    with pytest.raises(ExecutionError, match="Path: sam2. Reason: 'standin:connected-regions' is an offline"):
        run("segment_by_reference", segmented, {**params, **FAST})
    assert not segmented.has_field("new")


def test_a_summary_table_keeps_one_row_per_entry_whatever_its_text_and_shows_missing_figures_as_dash():
    from ntt_plugin.reports import metric, skipped_table

    skipped = [{"reference_id": "r1", "class_name": None, "reason": "mask | box disagree\nsee log"}]
    assert skipped_table(skipped).splitlines()[-1] == "| r1 | - | mask \\| box disagree see log |"
    assert [metric(v) for v in (None, float("nan"), -1.0, 0.25)] == ["-", "-", "-", "0.250"]


@pytest.mark.bad_input
def test_a_segment_form_with_an_unusable_grid_shows_the_error_under_it_and_no_estimate(dataset, models):
    foo.get_operator(uri("build_memory_bank"))(dataset, "gt", **models)
    params = dict(bank_key="references", pred_field="pred", **{**FAST, "points_per_side": ""}, **models)
    props = inputs_of("segment_by_reference", dataset, params)
    assert props["points_per_side"].error_message == "points_per_side must be at least 1, got ''"
    assert "estimate" not in props
