"""``ntt shards``: the shards of a dataset's sharded runs and their heartbeats (see :mod:`ntt_core.shards`)."""

from __future__ import annotations

import argparse

from ..shards import STALE_AFTER_S, shard_operations
from .options import CliError


def add_parser(commands, formatter) -> None:
    """The ``shards`` subcommand of ``ntt``."""
    shards = commands.add_parser(
        "shards",
        help="list the shards of sharded Segment-by-reference runs, with their heartbeats",
        description="Every shard operation of a dataset's sharded runs: state, progress and the age of its "
        "last heartbeat (a RUNNING shard without one for long is stale: its worker died). Recover a stale shard "
        "with `fiftyone delegated fail <id> && fiftyone delegated rerun <id>`.",
        formatter_class=formatter,
    )
    shards.add_argument("dataset", help="FiftyOne dataset name")
    shards.add_argument("--field", help="only the shards of this prediction field")
    shards.add_argument(
        "--stale-after", type=float, default=STALE_AFTER_S, help="seconds without a heartbeat that mark a shard stale"
    )
    shards.set_defaults(command=run_shards)


def run_shards(args: argparse.Namespace) -> None:
    """List the dataset's shards: state, progress, heartbeat, and which look stale."""
    import fiftyone as fo
    from fiftyone.operators.executor import ExecutionRunState

    if args.dataset not in fo.list_datasets():
        raise CliError(f"no dataset '{args.dataset}'")
    rows = shard_operations(args.dataset, args.field)
    if not rows:
        print(f"no sharded run on '{args.dataset}'" + (f" into '{args.field}'" if args.field else ""))
        return
    for row in rows:
        age = row["heartbeat_age_s"]
        beat = "no heartbeat yet" if age is None else f"heartbeat {age:.0f} s ago"
        stale = row["state"] == ExecutionRunState.RUNNING and (age is None or age > args.stale_after)
        attempt = f", attempt {row['attempt']}" if row["attempt"] > 1 else ""
        print(
            f"{row['id']}  {row['field']} shard {row['shard']}{attempt}  {row['state']}  "
            f"{row['progress'] or '-'}  {beat}" + ("  STALE: fail and rerun it" if stale else "")
        )
