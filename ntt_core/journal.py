"""A run's journal: each finished item recorded as it finishes, so a killed run resumes where it stopped.

The journal is a text file of JSON lines kept next to a run's output until the output is complete.
The first line identifies the run (``{"journal": 1, "run": {...}}``: bank, models, settings,
inputs); every other line is one finished item (``{"index": i, ...}``). Lines are only ever
appended, each with a single ``write`` and then flushed to disk (``fsync``) before the next item
starts, so after a kill every line but perhaps the last is complete; a last line without its
newline was cut by the kill and is dropped (its item runs again).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import NttError

VERSION = 1
SUFFIX = ".journal"
PAYLOAD = "payload"  # the key of a record's payload on disk


class JournalError(NttError):
    """A journal that cannot be resumed: another run's, or damaged."""


def journal_path(output: str | Path) -> Path:
    """Where the journal of the run writing ``output`` lives: ``<output>.journal``."""
    output = Path(output)
    return output.with_name(output.name + SUFFIX)


class Journal:
    """The finished items of one run, ``records`` by item index, and the open file new ones go to."""

    def __init__(self, path: Path, run: dict, records: dict[int, dict], handle) -> None:
        self.path, self.run, self.records, self._handle = path, run, records, handle

    @classmethod
    def create(cls, path: str | Path, run: dict) -> Journal:
        """A new journal for ``run`` (a JSON-able description that a resume must match); replaces
        any journal at ``path``."""
        path, run = Path(path), _as_json(run)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("w", encoding="utf-8")
        journal = cls(path, run, {}, handle)
        journal._append({"journal": VERSION, "run": run})
        return journal

    @classmethod
    def resume(cls, path: str | Path, run: dict) -> Journal:
        """The journal at ``path``, opened to take more records; raises :class:`JournalError` unless
        it was written by a run described exactly like ``run``."""
        path, run = Path(path), _as_json(run)
        header, records, complete_bytes = read(path)
        if header is None:  # killed while writing its first line: nothing finished
            return cls.create(path, run)
        _check_same_run(path, header["run"], run, set(run) | set(header["run"]))
        with path.open("r+b") as handle:  # drop a last line cut by a kill
            handle.truncate(complete_bytes)
        return cls(path, run, records, path.open("a", encoding="utf-8"))

    def append(self, record: dict, payload=None) -> None:
        """Record one finished item (``record["index"]``: its position in the run's inputs) with its
        ``payload`` (its results), which is kept on disk only: see :meth:`payloads`."""
        self._append({**record, PAYLOAD: payload})
        self.records[record["index"]] = record

    def payloads(self) -> Iterator[tuple[int, object]]:
        """(index, payload) of every recorded item, read back from disk in the order they were
        recorded, so a long run's results are never all in memory."""
        seen = set()
        for _, entry in _entries(self.path):
            if "index" in entry and entry["index"] not in seen:
                seen.add(entry["index"])
                yield entry["index"], entry[PAYLOAD]

    def _append(self, entry: dict) -> None:
        self._handle.write(json.dumps(entry, separators=(",", ":")) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()

    def remove(self) -> None:
        """Close and delete the journal (once the run's output is complete)."""
        self.close()
        self.path.unlink(missing_ok=True)


def check_resumable(path: str | Path, known: dict) -> None:
    """Raise :class:`JournalError` unless the journal at ``path`` was written by a run that agrees
    with ``known`` (part of a run's description, e.g. all but the models) on each of its keys; only
    the journal's first line is read. Lets a run refuse a foreign journal before any slow work."""
    path = Path(path)
    with path.open("rb") as handle:
        first = handle.readline()
    if not first.endswith(b"\n"):  # killed while writing its first line: nothing to disagree with
        return
    try:
        header = json.loads(first)
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict) or header.get("journal") != VERSION or not isinstance(header.get("run"), dict):
        raise JournalError(f"{path}: not a journal of this version; start again with --overwrite")
    _check_same_run(path, header["run"], _as_json(known), set(known))


def _check_same_run(path: Path, recorded: dict, run: dict, keys) -> None:
    differ = sorted(k for k in keys if recorded.get(k) != run.get(k))
    if differ:
        raise JournalError(
            f"{path}: the interrupted run used a different {', '.join(differ)}; resuming would mix results: "
            "run with the same bank, models, settings and images, or start again with --overwrite"
        )


def _as_json(value):
    """``value`` as it reads back from JSON (tuples become lists), so descriptions compare equal."""
    return json.loads(json.dumps(value))


def read(path: str | Path) -> tuple[dict | None, dict[int, dict], int]:
    """(header, records by index without their payloads, bytes of complete lines) of the journal
    at ``path``; a last line without a newline is left out (header None when no line is
    complete); any other line that is not a complete record is an error."""
    path = Path(path)
    header, records, complete = None, {}, 0
    for end, entry in _entries(path):
        complete = end
        if header is None:
            if not isinstance(entry, dict) or entry.get("journal") != VERSION or "run" not in entry:
                raise JournalError(f"{path}: not a journal of this version; start again with --overwrite")
            header = entry
        elif isinstance(entry, dict) and isinstance(entry.get("index"), int):
            records.setdefault(entry["index"], {k: v for k, v in entry.items() if k != PAYLOAD})
        else:
            raise JournalError(f"{path}: a record without its item index; start again with --overwrite")
    return header, records, complete


def _entries(path: Path) -> Iterator[tuple[int, dict]]:
    """(bytes up to the end of the line, parsed line) of every complete line of ``path``."""
    end = 0
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.endswith(b"\n"):
                return  # cut by a kill
            end += len(line)
            try:
                yield end, json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise JournalError(f"{path}: line {number} is damaged; start again with --overwrite") from None
