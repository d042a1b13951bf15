"""The Memory banks panel and the review-loop operators, run the ways the App runs them: panel
events through FiftyOne's executor (what the App would be told to render or do is read back from
the executor's requests), operators through ``execute_operator`` with the App's selection, and
forms resolved headless. Tiny random-weight models from disk."""

import asyncio
import base64
import io
import json
import sys

import fiftyone.operators as foo
import pytest
from fiftyone.operators.executor import ExecutionError, resolve_type
from fiftyone.operators.registry import OperatorRegistry
from fiftyone_scenes import field_documents, scenes_dataset
from PIL import Image
from test_plugin import FAST, uri

from ntt_core.bank_review import suggest_thresholds
from ntt_core.fiftyone import review
from ntt_core.fiftyone.bank_runs import load_memory_bank, memory_bank_info
from ntt_plugin.panel import EMPTY_STATE, NEEDS_LABELS, NEEDS_PREDICTION, NEEDS_SAMPLES, OUTSIDE_VIEW_IN_MODAL

PANEL = uri("memory_banks")


@pytest.fixture(scope="module")
def models(tiny_models) -> dict:
    return dict(sam2=str(tiny_models[0]), dinov2=str(tiny_models[1]), device="cpu")


@pytest.fixture(scope="module")
def segmented(models, tmp_path_factory):
    """Two references per class, a bank of them and predictions, for tests that only read."""
    dataset = scenes_dataset(tmp_path_factory.mktemp("panel"), count=4, size=(64, 80), references=2)
    foo.get_operator(uri("build_memory_bank"))(dataset, "gt", **models)
    foo.get_operator(uri("segment_by_reference"))(dataset, "references", "pred", **FAST, **models)
    yield dataset
    dataset.delete()


@pytest.fixture
def dataset(models, tmp_path):
    dataset = scenes_dataset(tmp_path, count=3, size=(64, 80), references=2)
    foo.get_operator(uri("build_memory_bank"))(dataset, "gt", **models)
    foo.get_operator(uri("segment_by_reference"))(dataset, "references", "pred", **FAST, **models)
    yield dataset
    dataset.delete()


def panel_event(method: str, collection, params=None, state=None, **ctx) -> list[dict]:
    """Run a panel event as the App does; returns what the App is asked to do (its requests, as
    the JSON the server sends)."""
    params = {"__method__": method, "panel_id": "panel-1", "panel_state": state or {}, **(params or {})}
    result = foo.execute_operator(PANEL, dict(view=collection.view(), **ctx), params=params)
    return json.loads(json.dumps(result.executor.to_json()["requests"]))


def rendered(requests: list[dict]) -> dict[str, dict]:
    """The panel's rendered properties by dotted path, from its show_panel_output request."""
    (output,) = [r["params"]["output"] for r in requests if r["operator_uri"] == "show_panel_output"]
    found = {}

    def walk(prop: dict, prefix: str) -> None:
        for name, child in prop["type"].get("properties", {}).items():
            found[prefix + name] = child
            walk(child, prefix + name + ".")

    walk(output, "")
    return found


def form_of(name: str, collection, params=None, **ctx) -> dict:
    """The operator's form resolved as the App resolves it (``ctx``: selected, selected_labels)."""
    request = dict(
        dataset_name=collection._root_dataset.name,
        view=collection.view()._serialize(),
        params=params or {},
        target="inputs",
        **ctx,
    )
    return asyncio.run(resolve_type(OperatorRegistry(), uri(name), request)).type.properties


def prompts(requests: list[dict]) -> list[dict]:
    return [r["params"] for r in requests if r["operator_uri"] == "prompt_user_for_operation"]


def selected(dataset, field: str, label) -> dict:
    sample_id = dataset.select_labels(ids=[label.id], fields=field).first().id
    return {"label_id": label.id, "sample_id": sample_id, "field": field, "frame_number": None}


def test_the_panel_is_registered_from_the_manifest():
    panel = foo.get_operator(PANEL)
    assert isinstance(panel, foo.Panel) and panel.config.label == "Memory banks"
    events = panel.resolve_panel_config()
    assert {"on_load", "on_change_selected", "on_change_selected_labels"} <= events.keys()


def test_empty_state_says_how_to_tag_references(tmp_path):
    dataset = scenes_dataset(tmp_path, count=1, size=(64, 80))
    try:
        view = rendered(panel_event("on_load", dataset))
    finally:
        dataset.delete()
    assert view["empty"]["default"] == EMPTY_STATE
    assert "label tag `reference`" in view["empty"]["default"] and "Build memory bank" in view["empty"]["default"]
    assert view["actions.build"]["view"]["label"] == "Build memory bank"
    assert view["actions.show_matched_reference"]["view"]["disabled"] is True
    assert not any(path.startswith("bank_") for path in view)


def decode(src: str) -> Image.Image:
    assert src.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


def test_each_bank_shows_models_classes_shots_thumbnails_and_suggestions(segmented, models):
    view = rendered(panel_event("on_load", segmented))
    bank = load_memory_bank(segmented, "references")
    summary = view["bank_0_summary"]["default"]
    assert summary.startswith("### Memory bank `references`")
    assert f"DINOv2 `{models['dinov2']}` at 56 px, SAM2 `{models['sam2']}`" in summary
    assert f"entries from `gt` ({len(bank.reference_ids)}); built from label tag `reference`" in summary
    assert "| Class | Shots | Negatives | Suggested threshold | Leave-one-out scores |" in summary
    for name, entry in suggest_thresholds(bank).items():
        threshold = "–" if entry["threshold"] is None else f"{entry['threshold']:.2f}"
        assert f"| {name} | {entry['shots']} | 0 | {threshold}" in summary
    assert any(entry["threshold"] is not None for entry in suggest_thresholds(bank).values())

    located = review.locate_references(segmented, bank)
    for index, name in enumerate(bank.classes):
        row = f"bank_0_class_{index}"
        assert view[f"{row}.class_name"]["default"] == f"**{name}**"
        thumbs = [p for path, p in view.items() if path.startswith(f"{row}.thumbnail_")]
        assert len(thumbs) == bank.counts()[name]
        for thumb in thumbs:
            image = decode(thumb["default"])
            assert max(image.size) == 96
            params = thumb["view"]["params"]
            assert thumb["view"]["alt"] == f"{name} reference {params['reference_id']}"
            assert thumb["view"]["operator"] == f"{PANEL}#open_reference"
            entry = located[params["reference_id"]]
            assert (params["sample_id"], params["field"]) == (entry.sample_id, "gt") and entry.label.label == name
    rows = {
        row: {path.split(".")[-1]: p["view"]["label"] for path, p in view.items() if path.startswith(f"bank_0_{row}.")}
        for row in ("actions", "review")
    }
    assert rows == {  # short labels, at most four a row: they fit a split layout and the modal's tab
        "actions": {"segment": "Segment view", "preview": "Preview selected", "export": "Export", "delete": "Delete"},
        "review": {
            "add_selected": "Accept selected",
            "add_negatives": "Add negatives",
            "remove_tagged": "Remove tagged",
        },
    }
    for row, button, why in (
        ("actions", "preview", NEEDS_SAMPLES),
        ("review", "add_selected", NEEDS_LABELS),
    ):  # disabled, saying why
        assert (
            view[f"bank_0_{row}.{button}"]["view"]["disabled"],
            view[f"bank_0_{row}.{button}"]["view"]["title"],
        ) == (True, why)
    assert view["bank_0_disabled"]["default"] == f"*{NEEDS_SAMPLES}; {NEEDS_LABELS}.*"
    assert view["actions.show_matched_reference"]["view"]["title"] == NEEDS_PREDICTION
    assert view["actions_disabled"]["default"] == f"*{NEEDS_PREDICTION}.*"
    assert view["actions.import_bank"]["view"]["label"] == "Import"
    assert "not applied" in view["threshold_note"]["default"]
    assert "tag false positives `not_this_class`" in view["review_help"]["default"]


def test_buttons_open_the_operators_forms_prefilled(segmented, models):
    on = {"bank_key": "references"}
    first = segmented.first().id
    expected = {
        "build": (uri("build_memory_bank"), None),
        "segment": (uri("segment_by_reference"), {**on, "sam2": models["sam2"], "dinov2": models["dinov2"]}),
        "preview": (
            uri("segment_by_reference"),
            {
                **on,
                "sam2": models["sam2"],
                "dinov2": models["dinov2"],
                "pred_field": "ntt_preview",
                "overwrite": True,
                "view_target": "SELECTED_SAMPLES",
            },
        ),
        "add_selected": (uri("add_to_memory_bank"), on),
        "add_negatives": (uri("add_negative_references"), on),
        "remove_tagged": (uri("remove_from_memory_bank"), on),
        "delete": (uri("delete_memory_bank"), on),
        "export": (uri("export_memory_bank"), on),
        "import_bank": (uri("import_memory_bank"), None),
    }
    for method, (operator, params) in expected.items():
        requests = panel_event(method, segmented, params=on, selected=[first])
        (prompt,) = prompts(requests)
        assert (prompt["operator_uri"], prompt["params"]) == (operator, params), method
        assert prompt["on_success"] == f"{PANEL}#refresh"
        assert rendered(requests)["bank_0_actions.preview"]["view"]["disabled"] is False  # a sample is selected


def test_delete_asks_for_confirmation_and_says_what_it_did(dataset):
    props = form_of("delete_memory_bank", dataset, {"bank_key": "references"})
    entries = memory_bank_info(dataset, "references")["num_references"]
    assert props["confirm"].view.label.startswith(
        f"Deletes memory bank 'references' ({entries} entries) from this dataset: this cannot be undone"
    )
    result = foo.execute_operator(uri("delete_memory_bank"), dict(dataset=dataset), params={"bank_key": "references"})
    assert result.result["summary"] == "Memory bank **references** deleted."
    assert dataset.list_runs(method="ntt_memory_bank") == []


def test_preview_runs_segment_by_reference_on_the_selected_samples_only(segmented, models):
    (prompt,) = prompts(panel_event("preview", segmented, params={"bank_key": "references"}))
    chosen = segmented.skip(1).first().id
    props = form_of("segment_by_reference", segmented, dict(prompt["params"]), selected=[chosen])  # FiftyOne pops keys
    assert not any(p.invalid for p in props.values())
    assert props["view_target"].default == "SELECTED_SAMPLES"
    params = {**prompt["params"], **FAST, "device": "cpu"}
    for sample_id in (chosen, segmented.first().id):  # a new preview replaces the last one
        run = dict(dataset=segmented, selected=[sample_id])
        report = foo.execute_operator(uri("segment_by_reference"), run, params=dict(params)).result["report"]
        assert report["processed"] == 1 and report["field"] == "ntt_preview"
        assert segmented.exists("ntt_preview").values("id") == [sample_id]


def test_show_matched_reference_opens_the_reference_sample(segmented):
    prediction = segmented.values("pred.detections", unwind=True)[0]
    match = review.matched_reference(segmented, "pred", prediction.id)
    label = selected(segmented, "pred", prediction)
    reference = {"label_id": prediction.reference_id, "sample_id": match["sample_id"], "field": "gt"}
    for requests in (  # in the user's view: opened at once, the view kept
        panel_event("show_matched_reference", segmented.view(), selected_labels=[label]),
        foo.execute_operator(
            uri("show_matched_reference"), dict(view=segmented.view(), selected_labels=[label])
        ).executor.to_json()["requests"],
    ):
        asked = {r["operator_uri"]: r["params"] for r in requests}
        assert "set_view" not in asked
        assert asked["open_sample"] == {"id": match["sample_id"], "group_id": None}
        assert asked["set_selected_labels"]["labels"] == [{**reference, "frame_number": None}]

    # outside it, from the panel: the whole dataset first (no Select stage), the user's view remembered
    elsewhere = segmented.exclude(match["sample_id"])
    sample_id = elsewhere.first().id
    requests = panel_event("show_matched_reference", elsewhere, selected_labels=[label])
    asked = {r["operator_uri"]: r["params"] for r in requests}
    assert json.loads(json.dumps(asked["set_view"]["view"])) == [] and "open_sample" not in asked
    patches = [r["params"]["state"] for r in requests if r["operator_uri"] == "patch_panel_state"]
    state = {key: value for patch in patches for key, value in patch.items()}
    assert state["return_to"]["step"] == "pending" and state["return_to"]["match"] == match
    kept = [{k: v for k, v in stage.items() if k != "_uuid"} for stage in state["return_to"]["view"]]
    assert kept == [{"_cls": "fiftyone.core.stages.Exclude", "kwargs": [["sample_ids", [match["sample_id"]]]]}]
    # from the sample modal's tab the change would close the modal and the panel with it: the view is kept
    requests = panel_event("show_matched_reference", elsewhere, selected_labels=[label], current_sample=sample_id)
    assert not [r for r in requests if r["operator_uri"] in ("set_view", "open_sample")]
    assert rendered(requests)["message"]["view"]["label"] == OUTSIDE_VIEW_IN_MODAL
    # the operator keeps the user's view and says how to see the reference
    report = foo.get_operator(uri("show_matched_reference"))(segmented, "pred", prediction.id)["report"]
    assert report == {**match, "note": None}
    report = foo.get_operator(uri("show_matched_reference"))(elsewhere, "pred", prediction.id)["report"]
    assert report["note"].startswith("the reference is outside your view, which is kept")


@pytest.mark.bad_input
def test_show_matched_reference_without_a_prediction_says_what_to_select(segmented):
    gt_label = segmented.first().gt.detections[0]
    requests = panel_event("show_matched_reference", segmented, selected_labels=[selected(segmented, "gt", gt_label)])
    message = (
        "Show matched reference: select a prediction of a 'Segment by reference' field first (in the sample modal)"
    )
    assert rendered(requests)["message"]["view"]["label"] == message
    assert not [r for r in requests if r["operator_uri"] in ("set_view", "open_sample")]
    with pytest.raises(ExecutionError, match="Path: no_prediction. Reason: select a prediction"):
        foo.execute_operator(uri("show_matched_reference"), dict(dataset=segmented))


def test_review_loop_through_the_operators(dataset, models):
    gt_before = field_documents(dataset, "gt")
    bank = load_memory_bank(dataset, "references")
    accepted = dataset.values("pred.detections", unwind=True)[0]
    pick = [selected(dataset, "pred", accepted)]

    props = form_of("add_to_memory_bank", dataset, selected_labels=pick)
    assert props["bank_key"].default == "references" and props["dinov2"].default == models["dinov2"]
    assert props["found"].view.label == f"1 label(s) become shots of: {accepted.label}: 1"
    params = {"device": "cpu"}
    result = foo.execute_operator(uri("add_to_memory_bank"), dict(dataset=dataset, selected_labels=pick), params=params)
    grown = load_memory_bank(dataset, "references")
    assert result.result["report"]["added"] == 1
    assert grown.counts()[accepted.label] == bank.counts()[accepted.label] + 1
    assert (grown.reference_ids[-1], grown.image_ids[-1]) == (accepted.id, pick[0]["sample_id"])
    second = dataset.values("pred.detections", unwind=True)[2]
    report = foo.get_operator(uri("add_to_memory_bank"))(dataset, "references", "pred", [second.id], device="cpu")
    grown = load_memory_bank(dataset, "references")
    assert report["report"]["added"] == 1 and grown.reference_ids[-1] == second.id

    look_alike = dataset.values("pred.detections", unwind=True)[1]
    dataset.select_labels(ids=[look_alike.id], fields="pred").tag_labels("not_this_class", label_fields="pred")
    props = form_of("add_negative_references", dataset)
    assert props["found"].view.label == f"1 label(s) become negative references of: {look_alike.label}: 1"
    report = foo.get_operator(uri("add_negative_references"))(dataset, "references", device="cpu")["report"]
    assert report["negative_counts"][look_alike.label] == 1

    removed = grown.reference_ids[0]
    dataset.select_labels(ids=[removed], fields="gt").tag_labels("remove_reference", label_fields="gt")
    props = form_of("remove_from_memory_bank", dataset)
    assert props["found"].view.label == "Labels tagged 'remove_reference': gt: 1"
    report = foo.get_operator(uri("remove_from_memory_bank"))(dataset, "references")["report"]
    final = load_memory_bank(dataset, "references")
    assert report["removed"] == [removed] and removed not in final.reference_ids
    assert len(final.reference_ids) == len(bank.reference_ids) + 2  # +2 shots, +1 negative, -1 removed
    review_log = memory_bank_info(dataset, "references")["review"]
    assert [entry["action"] for entry in review_log] == ["add", "add", "add", "remove"]

    summary = rendered(panel_event("on_load", dataset))["bank_0_summary"]["default"]
    assert f"| {look_alike.label} | {final.counts()[look_alike.label]} | 1 |" in summary
    gt_entries = len(bank.reference_ids) - 1  # one removed
    assert f"entries from `gt` ({gt_entries}), `pred` (3)" in summary  # every field its entries come from
    dataset.untag_labels("remove_reference", label_fields="gt")  # the test's own tag: the operators only read gt
    assert field_documents(dataset, "gt") == gt_before


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("name", "path", "reason"),
    [
        ("add_to_memory_bank", "no_selection", "no label selected: select accepted predictions in the App first"),
        ("add_negative_references", "tag", "no label is tagged 'not_this_class': tag false-positive predictions"),
        ("remove_from_memory_bank", "tag", "no label is tagged 'remove_reference': tag the references to remove"),
    ],
)
def test_review_operators_without_labels_are_form_errors(segmented, name, path, reason):
    runs = segmented.list_runs()
    with pytest.raises(ExecutionError, match=f"Validation error. Path: {path}. Reason: {reason}"):
        foo.execute_operator(uri(name), dict(dataset=segmented), params={"bank_key": "references"})
    assert segmented.list_runs() == runs


@pytest.mark.bad_input
def test_a_damaged_bank_is_shown_as_an_error_that_can_still_be_deleted(dataset):
    config = dataset.get_run_info("references").config
    config.sha256 = "0" * 64
    dataset.update_run_config("references", config)
    view = rendered(panel_event("on_load", dataset))
    assert view["bank_0_error"]["view"]["label"] == "Memory bank 'references' cannot be read"
    assert "does not match the checksum in its run config" in view["bank_0_error"]["view"]["description"]
    labels = [p["view"]["label"] for path, p in view.items() if path.startswith("bank_0_actions.")]
    assert labels == ["Delete"]


@pytest.mark.bad_input
def test_a_missing_library_is_shown_in_the_panel(segmented, monkeypatch):
    for name in [m for m in sys.modules if m == "ntt_core" or m.startswith("ntt_core.")]:
        monkeypatch.setitem(sys.modules, name, None)
    view = rendered(panel_event("on_load", segmented))
    assert view["library_missing"]["view"]["label"] == "The ntt_core library is missing"
    assert "pip install" in view["library_missing"]["view"]["description"]


def test_a_running_scheduled_segmentation_can_be_stopped_from_the_panel(segmented, models):
    from fiftyone.operators.delegated import DelegatedOperationService

    from ntt_core.fiftyone.stops import stop_requested
    from ntt_plugin.panel import STOP_NOTE

    params = dict(bank_key="references", pred_field="later", **FAST, **models)
    queued = foo.execute_operator(
        uri("segment_by_reference"), dict(dataset=segmented), params=params, request_delegation=True
    )
    service, operation_id = DelegatedOperationService(), queued.result["id"]
    try:
        assert not any(path.startswith("running_") for path in rendered(panel_event("on_load", segmented)))
        service.set_running(operation_id)  # what a worker does when it takes the operation
        service.set_progress(operation_id, dict(progress=0.5, label="image 2 of 4: prompts 2/4"))
        view = rendered(panel_event("on_load", segmented))
        assert view["running_0.progress"]["default"].endswith(": image 2 of 4: prompts 2/4")
        stop = view["running_0.stop"]["view"]
        assert (stop["label"], stop["disabled"], stop["params"]) == (
            "Stop after this image",
            False,
            {"operation_id": str(operation_id)},
        )
        view = rendered(panel_event("stop_run", segmented, params={"operation_id": str(operation_id)}))
        assert view["message"]["view"]["label"] == STOP_NOTE
        assert stop_requested(segmented, str(operation_id))
        stop = view["running_0.stop"]["view"]
        assert (stop["label"], stop["disabled"]) == ("Stop requested", True)
    finally:
        service.delete_operation(operation_id)


@pytest.mark.bad_input
def test_a_negative_that_is_already_a_reference_is_refused_in_the_form(dataset):
    bank = load_memory_bank(dataset, "references")
    reference = dataset.select_labels(ids=[bank.reference_ids[0]], fields="gt").values("gt.detections", unwind=True)[0]
    dataset.untag_labels("reference", "gt")
    dataset.select_labels(ids=[reference.id], fields="gt").tag_labels("not_this_class", "gt")
    before = memory_bank_info(dataset, "references")["sha256"]
    reason = f"1 of these label\\(s\\) are already entries of memory bank 'references' \\({reference.id}\\): remove their tag"
    with pytest.raises(ExecutionError, match=f"Validation error. Path: bank_key. Reason: {reason}"):
        foo.execute_operator(uri("add_negative_references"), dict(dataset=dataset), params={"bank_key": "references"})
    assert memory_bank_info(dataset, "references")["sha256"] == before
