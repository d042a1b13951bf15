"""Sharded runs a user can recover without guessing: heartbeats that tell a stale shard from a live
one (``ntt shards``), a shard that stops once its operation is marked failed, a planning step that
can be run again, and one label per shard copy. Shards run in this process through FiftyOne's
delegated-operation service (``tests/test_plugin_workers.py`` runs real workers)."""

from __future__ import annotations

from datetime import timedelta

import fiftyone.operators as foo
import pytest
from bson import ObjectId
from fiftyone.operators.delegated import DelegatedOperationService
from fiftyone.operators.executor import ExecutionRunState
from fiftyone_scenes import scenes_dataset
from test_plugin import FAST, uri

from ntt_core.cli import main
from ntt_core.fiftyone.predictions import prediction_record, start_sharded_prediction
from ntt_core.models import load_models
from ntt_core.predictor import Predictor
from ntt_core.settings import Settings
from ntt_core.shards import STALE_AFTER_S, shard_operations


@pytest.fixture
def dataset(tmp_path, tiny_models):
    dataset = scenes_dataset(tmp_path, count=6, size=(64, 80))
    foo.get_operator(uri("build_memory_bank"))(
        dataset, "gt", sam2=str(tiny_models[0]), dinov2=str(tiny_models[1]), device="cpu"
    )
    yield dataset
    DelegatedOperationService().delete_for_dataset(dataset._doc.id)
    dataset.delete()


@pytest.fixture(scope="module")
def params(tiny_models) -> dict:
    return dict(bank_key="references", pred_field="pred", sam2=str(tiny_models[0]), dinov2=str(tiny_models[1]))


def plan(dataset, params: dict, shards: int = 2) -> dict:
    return foo.get_operator(uri("segment_by_reference"))(dataset, **params, **FAST, device="cpu", num_shards=shards)[
        "report"
    ]


def run_one(dataset) -> list:
    return DelegatedOperationService().execute_queued_operations(dataset_name=dataset.name, limit=1)


def test_heartbeats_tell_stale_shards_from_live_ones(dataset, params, capsys):
    shards = plan(dataset, params)["shards"]
    assert [s["shard"] for s in shards] == ["1/2", "2/2"]
    (result,) = run_one(dataset)
    assert result.error is None
    rows = shard_operations(dataset.name, "pred")
    done, waiting = sorted(rows, key=lambda row: row["state"] != ExecutionRunState.COMPLETED)
    assert done["state"] == ExecutionRunState.COMPLETED and done["progress"] == "Images: 3/3"
    assert done["heartbeat"] is not None and waiting["heartbeat"] is None

    DelegatedOperationService().set_running(ObjectId(waiting["id"]))  # a worker took it ... and died
    later = done["heartbeat"] + timedelta(seconds=STALE_AFTER_S + 60)
    assert all(row["heartbeat_age_s"] > STALE_AFTER_S for row in shard_operations(dataset.name, "pred", now=later))
    assert main(["shards", dataset.name, "--field", "pred", "--stale-after", "0"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert len(lines) == 2 and "STALE" not in lines[done["id"]]  # finished: never stale
    assert lines[waiting["id"]].startswith(f"{waiting['id']}  pred shard {waiting['shard']}  running")
    assert lines[waiting["id"]].endswith("STALE: fail and rerun it")
    assert main(["shards", dataset.name, "--field", "other"]) == 0
    assert capsys.readouterr().out == f"no sharded run on '{dataset.name}' into 'other'\n"


def test_a_shard_marked_failed_writes_nothing_more(dataset, params, monkeypatch):
    plan(dataset, params)
    service = DelegatedOperationService()
    real, failed = Predictor.predict_paths, []

    def fail_while_running(self, paths):  # `fiftyone delegated fail <id>` while the worker runs
        results = real(self, paths)
        (running,) = [row for row in shard_operations(dataset.name, "pred") if row["state"] == "running"]
        service.set_failed(ObjectId(running["id"]))
        failed.append(running)
        return results

    monkeypatch.setattr(Predictor, "predict_paths", fail_while_running)
    (result,) = run_one(dataset)
    assert result.error == "Operation state changed externally during execution."  # FiftyOne's words
    assert len(failed) == 1  # stopped before writing the batch in flight, so nothing was written after the fail
    assert len(dataset.select(failed[0]["sample_ids"]).exists("pred")) == 0
    assert service.get(ObjectId(failed[0]["id"])).run_state == ExecutionRunState.FAILED


def test_re_running_a_planning_step_that_died_continues_it(dataset, params, tiny_models):
    segmenter, encoder = load_models(params["sam2"], params["dinov2"], device="cpu")
    start_sharded_prediction(dataset, "references", "pred", segmenter, encoder, 2, settings=Settings(**FAST))
    assert dataset.has_field("pred")  # ... and the planning operation died here, before queueing

    report = plan(dataset, params)  # what re-running it does
    assert [s["samples"] for s in report["shards"]] == [3, 3]
    assert prediction_record(dataset, "pred")["planning"] is False
    with pytest.raises(Exception, match="field 'pred' already exists"):  # a finished planning is not silently redone
        plan(dataset, params)

    resumed = foo.get_operator(uri("segment_by_reference"))(
        dataset, **params, **FAST, device="cpu", num_shards=2, skip_existing=True
    )["report"]
    assert resumed["shards"] == [] and resumed["left_to_queued_shards"] == 6  # no sample given to two shards


def test_a_re_run_shard_has_its_own_label(dataset, params):
    plan(dataset, params)
    service = DelegatedOperationService()
    first = shard_operations(dataset.name, "pred")[0]
    service.set_running(ObjectId(first["id"]))
    service.set_failed(ObjectId(first["id"]))  # the documented recovery: fail ...
    service.rerun_operation(ObjectId(first["id"]))  # ... and rerun
    results = DelegatedOperationService().execute_queued_operations(dataset_name=dataset.name)
    assert [r.error for r in results] == [None, None]
    operations = service.list_operations(dataset_name=dataset.name, operator=uri("segment_by_reference"))
    labels = sorted(op.label for op in operations if "shard" in (op.label or ""))
    assert labels == [
        "Segment by reference (pred, shard 1/2)",
        "Segment by reference (pred, shard 1/2, attempt 2)",
        "Segment by reference (pred, shard 2/2)",
    ]
    assert len(dataset.exists("pred")) == len(dataset)


def test_a_field_is_not_overwritten_under_its_live_shards(dataset, params):
    plan(dataset, params)  # two shards queued
    for shards in (1, 2):
        with pytest.raises(Exception, match="shards of a run into 'pred' are still queued or running: let them finish"):
            foo.get_operator(uri("segment_by_reference"))(
                dataset, **params, **FAST, device="cpu", num_shards=shards, overwrite=True
            )
    results = DelegatedOperationService().execute_queued_operations(dataset_name=dataset.name)
    assert [r.error for r in results] == [None, None]
    foo.get_operator(uri("segment_by_reference"))(dataset, **params, **FAST, device="cpu", overwrite=True)
