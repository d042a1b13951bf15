"""Sharded runs as FiftyOne delegated operations: which shards exist and which are alive
(listed by ``ntt shards``, :mod:`ntt_core.cli.shards`).

A sharded *Segment by reference* is N+1 delegated operations: the planning one (it creates the
field and queues the shards) and one per shard, each over fixed sample ids. A running shard
reports its progress after every batch; FiftyOne stores it with its time, which is the shard's
heartbeat: a RUNNING shard whose heartbeat is old is stale (its worker died). A shard whose
operation was marked failed (``fiftyone delegated fail``) writes nothing more (it asks before
writing each batch), so a re-run copy and the old worker never write the same samples.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone

from .errors import NttError

SEGMENT_OPERATOR = "@ntt/no-time-to-train/segment_by_reference"
#: A RUNNING shard without a heartbeat for this long is shown as probably stale.
STALE_AFTER_S = 600.0


def _service():
    from fiftyone.operators.delegated import DelegatedOperationService

    return DelegatedOperationService()


def shard_operations(dataset_name: str, pred_field: str | None = None, now: datetime | None = None) -> list[dict]:
    """The shard operations of sharded runs on ``dataset_name`` (of ``pred_field`` only, if given), in
    queueing order: ``{"id", "field", "shard", "attempt", "state", "progress", "heartbeat",
    "heartbeat_age_s", "samples", "sample_ids"}``. ``attempt`` counts the copies of a shard made by
    re-running it (1 for the first); ``heartbeat`` is the time of the last progress report (or of the
    start), None before a worker took it."""
    now = now or datetime.now(timezone.utc).replace(tzinfo=None)  # FiftyOne stores naive UTC times
    rows, attempts = [], {}
    operations = _service().list_operations(operator=SEGMENT_OPERATOR, dataset_name=dataset_name)
    for operation in sorted(operations, key=lambda op: (op.queued_at or now, str(op.id))):
        params = (operation.context.request_params or {}).get("params", {}) if operation.context else {}
        if params.get("shard_sample_ids") is None or (pred_field and params.get("pred_field") != pred_field):
            continue
        key = (params.get("pred_field"), params.get("shard"))
        attempts[key] = attempts.get(key, 0) + 1
        status = operation.status
        heartbeat = (status.updated_at if status is not None else None) or operation.started_at
        rows.append(
            {
                "id": str(operation.id),
                "field": params.get("pred_field"),
                "shard": params.get("shard"),
                "attempt": attempts[key],
                "state": operation.run_state,
                "progress": status.label if status is not None else None,
                "heartbeat": heartbeat,
                "heartbeat_age_s": (now - heartbeat).total_seconds() if heartbeat else None,
                "samples": len(params["shard_sample_ids"]),
                "sample_ids": list(params["shard_sample_ids"]),
            }
        )
    return rows


def live_shard_sample_ids(dataset_name: str, pred_field: str) -> set[str]:
    """Sample ids of ``pred_field``'s shards still queued or running: a re-planned run leaves them to those shards."""
    from fiftyone.operators.executor import ExecutionRunState

    live = (ExecutionRunState.QUEUED, ExecutionRunState.SCHEDULED, ExecutionRunState.RUNNING)
    return {i for row in shard_operations(dataset_name, pred_field) if row["state"] in live for i in row["sample_ids"]}


def check_no_live_shards(dataset_name: str, pred_field: str) -> None:
    """Raise unless no shard of ``pred_field`` is queued or running: overwriting the field under them
    would mix their results (of the settings they were queued with) into the new run's."""
    if live_shard_sample_ids(dataset_name, pred_field):
        raise NttError(
            f"shards of a run into '{pred_field}' are still queued or running: let them finish, or fail them "
            "(`ntt shards` lists them), before overwriting the field"
        )


def stopped_check(operation_id):
    """A test for the running shard ``operation_id``: true once its operation is no longer RUNNING
    (marked failed, or taken over), read from the database each time."""
    from fiftyone.operators.executor import ExecutionRunState

    service = _service()

    def stopped() -> bool:
        operation = service.get(operation_id)
        return operation is None or operation.run_state != ExecutionRunState.RUNNING

    return stopped


def label_attempt(operation_id, label_for: Callable[[int], str]) -> str:
    """Give the running shard ``operation_id`` the label ``label_for(attempt)``, unique among the
    copies of its shard (attempt 1 for the first, k for the (k-1)-th re-run); returns it."""
    operation = _service().get(operation_id)
    request = operation.context.request_params
    rows = shard_operations(request.get("dataset_name"), request.get("params", {}).get("pred_field"))
    label = label_for(next((row["attempt"] for row in rows if row["id"] == str(operation_id)), 1))
    if operation.label != label:
        _service().set_label(operation_id, label)
    return label
