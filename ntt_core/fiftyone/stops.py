"""Stopping a scheduled (delegated) run: the Memory banks panel lists this dataset's running
segmentations and records a stop request in FiftyOne's execution store; the run reads it after
each image (``ntt_plugin.common.run_with_progress``) and ends with everything written so far kept."""

from __future__ import annotations

from ..shards import SEGMENT_OPERATOR

STORE = "ntt_stop_requests"
STOP_REQUEST_TTL_S = 7 * 24 * 3600  # a request outlives any run it can stop


def _store(dataset):
    from fiftyone.operators.store import ExecutionStore

    return ExecutionStore.create(STORE, dataset_id=dataset._root_dataset._doc.id)


def running_segmentations(dataset) -> list[dict]:
    """The delegated Segment-by-reference runs of ``dataset`` that a worker is running:
    ``{"id", "label", "progress", "stop_requested"}``, oldest first."""
    from fiftyone.operators.delegated import DelegatedOperationService
    from fiftyone.operators.executor import ExecutionRunState

    operations = DelegatedOperationService().list_operations(
        operator=SEGMENT_OPERATOR, dataset_name=dataset._root_dataset.name, run_state=ExecutionRunState.RUNNING
    )
    store = _store(dataset)
    return [
        {
            "id": str(op.id),
            "label": op.label or "Segment by reference",
            "progress": op.status.label if op.status is not None else None,
            "stop_requested": bool(store.get(str(op.id))),
        }
        for op in sorted(operations, key=lambda op: str(op.id))
    ]


def request_stop(dataset, operation_id: str) -> None:
    """Ask the delegated run ``operation_id`` to stop after the image it is on."""
    _store(dataset).set(str(operation_id), True, ttl=STOP_REQUEST_TTL_S)


def stop_requested(dataset, operation_id: str) -> bool:
    return bool(_store(dataset).get(str(operation_id)))
