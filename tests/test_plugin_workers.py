"""Sharded runs on real ``fiftyone delegated launch`` workers: a worker killed with SIGKILL keeps
the samples it finished and its stale shard is re-queued and finished; two workers sharing one
database label every sample exactly once (FiftyOne claims a queued operation atomically: it moves
it to RUNNING with a ``find_one_and_update`` filtered on the QUEUED state).

The re-queue recipe tested here is the documented one: ``fiftyone delegated fail <id>`` (the
operation is stale) and ``fiftyone delegated rerun <id>`` (a new queued copy); shards always
run with ``skip_existing``, so the copy only does what the dead worker left undone.
"""

import signal

import fiftyone.operators as foo
import pytest
from bson import ObjectId
from delegated_workers import start_worker, stop, wait_for
from fiftyone.operators.delegated import DelegatedOperationService
from fiftyone.operators.executor import ExecutionRunState
from fiftyone_scenes import scenes_dataset

SEGMENT = "@ntt/no-time-to-train/segment_by_reference"
BUILD = "@ntt/no-time-to-train/build_memory_bank"
SLOW = dict(points_per_side=4, sam_iou_threshold=0.0, max_detections=5)
pytestmark = pytest.mark.slow


@pytest.fixture
def dataset(tmp_path, tiny_models):
    """A persistent dataset (worker processes open it by name) with a memory bank; deleted after."""
    dataset = scenes_dataset(tmp_path, count=10, size=(64, 80))
    dataset.persistent = True
    foo.get_operator(BUILD)(dataset, "gt", sam2=str(tiny_models[0]), dinov2=str(tiny_models[1]), device="cpu")
    yield dataset
    DelegatedOperationService().delete_for_dataset(dataset._doc.id)
    dataset.delete()


def queue_shards(dataset, tiny_models, shards: int) -> list[str]:
    params = dict(num_shards=shards, sam2=str(tiny_models[0]), dinov2=str(tiny_models[1]), device="cpu", **SLOW)
    report = foo.get_operator(SEGMENT)(dataset, "references", "pred", **params)["report"]
    return [shard["operation_id"] for shard in report["shards"]]


def states(ids: list[str]) -> list[str]:
    service = DelegatedOperationService()
    return [service.get(ObjectId(i)).run_state for i in ids]


def test_killed_worker_keeps_finished_samples_and_its_requeued_shard_finishes(dataset, tiny_models, tmp_path):
    shards = queue_shards(dataset, tiny_models, shards=2)
    log = tmp_path / "worker.log"
    worker = start_worker(log)
    try:
        wait_for(lambda: len(dataset.exists("pred")) >= 2, 240, "the worker to finish 2 samples", [log])
    finally:
        stop(worker, signal.SIGKILL)
    done = dataset.exists("pred")
    finished = {s.id: [(d.id, d.label, d.bounding_box) for d in s.pred.detections] for s in done}
    assert 2 <= len(finished) < len(dataset) // 2, "the worker was not killed halfway through its shard"
    assert sorted(states(shards)) == [ExecutionRunState.QUEUED, ExecutionRunState.RUNNING]
    stale, other = shards if states(shards)[0] == ExecutionRunState.RUNNING else shards[::-1]  # RUNNING forever

    service = DelegatedOperationService()
    service.set_failed(ObjectId(stale))  # what `fiftyone delegated fail <id>` does
    assert states([stale]) == [ExecutionRunState.FAILED]
    rerun = service.rerun_operation(ObjectId(stale))  # what `fiftyone delegated rerun <id>` does
    results = service.execute_queued_operations(dataset_name=dataset.name)
    assert [r.error for r in results] == [None, None]
    reports = {str(r.result["report"]["skipped_existing"] > 0): r.result["report"] for r in results}
    assert reports["True"]["skipped_existing"] == len(finished)  # the rerun resumed the dead worker's shard
    assert sum(r["processed"] for r in reports.values()) == len(dataset) - len(finished)
    assert len(dataset.exists("pred")) == len(dataset)
    again = {s.id: [(d.id, d.label, d.bounding_box) for d in s.pred.detections] for s in dataset.select(list(finished))}
    assert again == finished  # finished samples were neither lost nor redone
    assert states([str(rerun.id), other]) == [ExecutionRunState.COMPLETED] * 2

    # the killed run's samples are whole: what an uninterrupted run writes for them
    params = dict(sam2=str(tiny_models[0]), dinov2=str(tiny_models[1]), device="cpu", **SLOW)
    foo.get_operator(SEGMENT)(dataset.select(list(finished)), "references", "pred_again", **params)
    for sample in dataset.select(list(finished)):
        assert [(d.label, d.bounding_box, d.confidence) for d in sample.pred.detections] == [
            (d.label, d.bounding_box, d.confidence) for d in sample.pred_again.detections
        ]


def test_two_workers_label_every_sample_exactly_once(dataset, tiny_models, tmp_path):
    ids = queue_shards(dataset, tiny_models, shards=4)
    logs = [tmp_path / "worker1.log", tmp_path / "worker2.log"]
    workers = [start_worker(log) for log in logs]
    try:
        wait_for(
            lambda: all(s in (ExecutionRunState.COMPLETED, ExecutionRunState.FAILED) for s in states(ids)),
            300,
            "4 shards",
            logs,
        )
    finally:
        for worker in workers:
            stop(worker)
    assert states(ids) == [ExecutionRunState.COMPLETED] * 4
    service = DelegatedOperationService()
    reports = [service.get(ObjectId(i)).result.result["report"] for i in ids]
    assert sum(r["processed"] for r in reports) == len(dataset)  # no sample written twice
    assert all(r["skipped_existing"] == 0 for r in reports)  # no shard met another shard's samples
    assert len(dataset.exists("pred")) == len(dataset)
    ran = [log.read_text().count("Running operation") for log in logs]
    assert sum(ran) == 4, ran
