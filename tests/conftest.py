"""Shared test set-up: one private MongoDB per session, offline model hubs, tiny models, two threads.

At import (before any test module imports fiftyone) this starts the ``mongod`` FiftyOne would use on a
free loopback port with a temporary data folder, and exports the settings below in ``os.environ`` so
subprocesses started by tests (CLI runs, operator workers) use the same database and stay offline.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("ntt_core") is None:
    sys.path.insert(0, str(REPO))


def _load_database_helper():
    """scripts/fiftyone_database.py, imported without putting scripts/ on sys.path."""
    name = "fiftyone_database"
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / "fiftyone_database.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fiftyone_database = _load_database_helper()
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="ntt-tests-"))
_PLUGINS_DIR = _SESSION_DIR / "plugins"
_PLUGINS_DIR.mkdir()
(_PLUGINS_DIR / "ntt").symlink_to(REPO, target_is_directory=True)  # fiftyone.yml sits at the repo root

os.environ.update(
    {
        "FIFTYONE_DATABASE_DIR": str(_SESSION_DIR / "fiftyone-db"),  # unused while the URI below is set
        "FIFTYONE_DATABASE_VALIDATION": "false",
        "FIFTYONE_DO_NOT_TRACK": "true",
        "FIFTYONE_SHOW_PROGRESS_BARS": "false",
        "FIFTYONE_PLUGINS_DIR": str(_PLUGINS_DIR),
        "FIFTYONE_DEFAULT_DATASET_DIR": str(_SESSION_DIR / "datasets"),
        "HF_HOME": str(_SESSION_DIR / "hf"),  # no test may lean on a model cached on this machine
        "HF_HUB_OFFLINE": "1",
        "NTT_CACHE_DIR": str(_SESSION_DIR / "ntt-cache"),  # the candidate cache's default folder
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "2",
        "MPLBACKEND": "Agg",
    }
)

_MONGOD_PROBLEM = None
_SERVER = None
try:
    _SERVER = fiftyone_database.start_mongod(_SESSION_DIR / "mongod")
    os.environ["FIFTYONE_DATABASE_URI"] = _SERVER.uri
except fiftyone_database.MongodError as error:  # tests that need FiftyOne fail with FiftyOne's own error
    _MONGOD_PROBLEM = str(error)


def _stop_session_database() -> None:
    if _SERVER is not None:
        _SERVER.stop()
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)


# Stopped at exit, not in a pytest hook: FiftyOne's own exit handler (registered later, so run earlier)
# queries the database and would wait 30 s for a stopped one. A killed run's mongod gets SIGTERM from
# the kernel when pytest dies (see fiftyone_database.start_mongod).
atexit.register(_stop_session_database)


def pytest_configure(config):
    import torch

    torch.set_num_threads(2)
    if os.environ.get("CI") and config.option.durations is None:
        config.option.durations = 15  # CI logs show the slowest tests


def pytest_collection_modifyitems(session, config, items):
    """Browser tests last: Playwright's sync API keeps an event loop running in the main thread until the
    session ends, and FiftyOne's executor (``asyncio.run``) cannot run under it."""
    items.sort(key=lambda item: item.get_closest_marker("browser") is not None)  # stable: order kept otherwise


def pytest_report_header(config):
    if _SERVER is not None:
        return f"MongoDB for this session: {_SERVER.uri} (pid {_SERVER.pid}, data in {_SERVER.dbpath})"
    return f"MongoDB for this session: NOT STARTED ({_MONGOD_PROBLEM}); run scripts/setup.sh --dev"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> tuple[Path, Path]:
    """(sam2_dir, dinov2_dir): tiny random-weight models saved with ``save_pretrained`` once per session."""
    from tiny_models import save_tiny_models

    return save_tiny_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny COCO folder (see coco_folder.py): four images, ``images/`` and ``annotations.json``."""
    from coco_folder import write_coco_folder

    return write_coco_folder(tmp_path_factory.mktemp("coco"))


@pytest.fixture(scope="module")
def models(tiny_models) -> dict:
    """The tiny models as operator parameters, on CPU."""
    return dict(sam2=str(tiny_models[0]), dinov2=str(tiny_models[1]), device="cpu")


@pytest.fixture
def dataset(tmp_path):
    """Three scenes (see fiftyone_scenes.py) in a new FiftyOne dataset, deleted afterwards."""
    from fiftyone_scenes import scenes_dataset

    dataset = scenes_dataset(tmp_path, count=3, size=(64, 80))
    yield dataset
    dataset.delete()
