"""Memory banks stored on a dataset as runs of method ``ntt_memory_bank``: the bank's JSON
payload is the run result, its checksum and description the run config."""

from __future__ import annotations

import keyword
import re
from pathlib import Path

import fiftyone.core.utils as fou

from .fields import BANK_METHOD, FiftyOneAdapterError, check_key

DEFAULT_BANK_KEY = "references"
STANDIN_PREFIX = "standin:"  # model ids of ntt_core.standins


def check_loadable_model(source: str, role: str) -> None:
    """Raise if the model field ``source`` names an offline stand-in (``standin:*``, a bank of
    ``ntt demo --offline``): those are made in code by the demo, no model loader can load them."""
    if isinstance(source, str) and source.startswith(STANDIN_PREFIX):
        raise FiftyOneAdapterError(
            f"'{source}' is an offline stand-in model of `ntt demo --offline`: it cannot be loaded here, so "
            f"banks built with it cannot segment from the App; give a {role} checkpoint (hub id, short name or "
            "local folder) and a bank built with it"
        )


# imports torch: loaded at first use, so that forms resolve in the App without it
memory_bank = fou.lazy_import("ntt_core.memory_bank")


def list_memory_banks(dataset) -> list[str]:
    """Keys of the memory banks stored on ``dataset``."""
    return dataset._root_dataset.list_runs(method=BANK_METHOD)


def memory_bank_info(dataset, key: str) -> dict:
    """What a stored bank holds (classes, counts, models, source) and when it was built."""
    _check_bank_exists(dataset, key)
    info = dataset._root_dataset.get_run_info(key)
    return {**info.config.serialize(), "key": key, "timestamp": str(info.timestamp)}


def _check_bank_exists(dataset, key: str) -> None:
    banks = list_memory_banks(dataset)
    if key not in banks:
        available = f"available: {', '.join(banks)}" if banks else "the dataset has no memory bank; build one first"
        raise FiftyOneAdapterError(f"no memory bank '{key}' on dataset '{dataset._root_dataset.name}' ({available})")


def check_bank_key(dataset, key: str, overwrite: bool = False) -> None:
    """Raise unless a memory bank may be stored under ``key``."""
    dataset = dataset._root_dataset
    check_key(key, "memory bank name")
    if dataset.has_run(key):
        if key not in list_memory_banks(dataset):
            raise FiftyOneAdapterError(f"run key '{key}' is taken by a run that is not a memory bank")
        if not overwrite:
            raise FiftyOneAdapterError(
                f"memory bank '{key}' already exists: choose another name or allow overwriting it"
            )


def save_memory_bank(dataset, key: str, bank, source: dict | None = None, overwrite: bool = False) -> None:
    """Store ``bank`` on the dataset as a run: JSON payload as the result, checksum in the config."""
    dataset = dataset._root_dataset
    check_bank_key(dataset, key, overwrite)
    payload = bank.to_payload()
    manifest = payload["manifest"]
    described = dict(
        classes=list(bank.classes),
        counts=bank.counts(),
        num_references=len(bank.reference_ids),
        reference_sample_ids=sorted(set(bank.image_ids)),
        encoder_id=bank.encoder_id,
        encoder_fingerprint=bank.encoder_fingerprint,
        encoder_input_size=bank.encoder_input_size,
        segmenter_id=bank.segmenter_id,
        sha256=manifest["sha256"],
        schema_version=manifest["schema_version"],
        num_skipped=len(bank.skipped),
        gt_field=None,
    )
    config = dataset.init_run(method=BANK_METHOD, **{**described, **(source or {})})
    dataset.register_run(key, config, overwrite=True)
    dataset.save_run_results(key, dataset.init_run_results(key, bank=payload), overwrite=True, cache=False)


def load_memory_bank(dataset, key: str):
    """The :class:`~ntt_core.memory_bank.MemoryBank` stored under ``key``, validated (schema,
    shapes, dtypes, checksum against the run config)."""
    _check_bank_exists(dataset, key)
    dataset = dataset._root_dataset
    results = dataset.load_run_results(key, cache=False, load_view=False)
    payload = getattr(results, "bank", None)
    if not isinstance(payload, dict):
        raise memory_bank.MemoryBankError(f"memory bank '{key}': the stored run has no bank payload")
    expected = dataset.get_run_info(key).config.sha256
    if payload.get("manifest", {}).get("sha256") != expected:
        raise memory_bank.MemoryBankError(
            f"memory bank '{key}': the stored payload does not match the checksum in its run config"
        )
    return memory_bank.MemoryBank.from_payload(payload)


def bank_reference_ids(dataset, key: str) -> list[str]:
    """The label ids of bank ``key``'s entries (shots and negatives), read from its manifest alone."""
    _check_bank_exists(dataset, key)
    results = dataset._root_dataset.load_run_results(key, cache=False, load_view=False)
    return list((getattr(results, "bank", None) or {}).get("manifest", {}).get("reference_ids", []))


def delete_memory_bank(dataset, key: str) -> None:
    _check_bank_exists(dataset, key)
    dataset._root_dataset.delete_run(key)


def export_memory_bank(dataset, key: str, directory: str | Path) -> Path:
    """Write the stored bank as ``manifest.json`` + ``features.safetensors`` under ``directory``."""
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise FiftyOneAdapterError(f"{directory}: export folder is not empty")
    return load_memory_bank(dataset, key).save(directory)


def imported_bank_key(directory: str | Path | None) -> str:
    """The name an imported bank keeps: its folder's (as exported, e.g. ``.../references``), made a
    valid key; ``imported`` when the folder's name cannot be one."""
    name = re.sub(r"\W", "_", Path(directory).name) if directory else ""
    return name if name.isidentifier() and not keyword.iskeyword(name) else "imported"


def import_memory_bank(dataset, key: str, directory: str | Path, overwrite: bool = False):
    """Read a bank folder written by :func:`export_memory_bank` (or the CLI) into the dataset."""
    check_bank_key(dataset, key, overwrite)
    bank = memory_bank.MemoryBank.load(directory)
    save_memory_bank(dataset, key, bank, source={"imported_from": str(directory)}, overwrite=overwrite)
    return bank
