"""Real ``fiftyone delegated launch`` worker processes for the tests that run scheduled operations."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

FIFTYONE_CLI = Path(sys.executable).parent / "fiftyone"


def start_worker(log: Path) -> subprocess.Popen:
    """A worker polling this session's database (``os.environ``) for queued operations; output in ``log``."""
    return subprocess.Popen(
        [str(FIFTYONE_CLI), "delegated", "launch"],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=os.environ,
        start_new_session=True,
    )


def stop(worker: subprocess.Popen, sig=signal.SIGINT) -> None:
    if worker.poll() is None:
        os.kill(worker.pid, sig)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(worker.pid, signal.SIGKILL)
            worker.wait()


def wait_for(condition, timeout: float, what: str, logs=()):
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            tails = "\n".join(log.read_text()[-3000:] for log in logs if log.exists())
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")
        time.sleep(0.05)
