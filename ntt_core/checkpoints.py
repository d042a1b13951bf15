"""Model weights from the Hugging Face hub or from disk, loaded strictly.

Hub files land in the standard cache (``HF_HOME`` / ``HF_HUB_CACHE``) through ``hf_hub_download``.
The cache is read first; a file that is not there costs one request without retries to learn
whether the hub answers, so an offline machine gets its error at once rather than after
``huggingface_hub``'s back-off (five retries: 25 s and more per file).

A ``transformers`` folder (``config.json`` + ``model.safetensors``) is loaded only if its weights fill
the model exactly: after ``transformers``' own key renaming and the model's ignore lists (e.g. the
video memory modules of a ``sam2_video`` checkpoint, which ``Sam2Model`` skips on purpose), any
missing, unplaced or wrongly shaped tensor is a :class:`CheckpointError`, never a random weight.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import NttError
from .meta_checkpoints import CheckpointError, _listing

HUB_TIMEOUT_S = 5.0  # seconds one metadata request may take before a download
WEIGHTS_NAME = "model.safetensors"
SHARDS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"


class ModelNotFoundError(NttError):
    """A model that is neither on disk nor in the hub cache, and cannot be downloaded."""


class MissingHubFile(ModelNotFoundError):
    """A hub repository that exists but has no such file."""


@dataclass(frozen=True)
class ModelKind:
    """What a model choice is for: its name in messages, the option that sets it, the config types it accepts."""

    name: str  # "SAM2"
    option: str  # "--sam2 / sam2="
    model_types: tuple[str, ...]  # config.json model_type values that fit


# ---------------------------------------------------------------------------------------------
# The hub


def hub_file(repo_id: str, filename: str, kind: ModelKind) -> Path:
    """The local path of ``filename`` of hub repo ``repo_id``: from the cache, else downloaded (with
    huggingface_hub's progress bar). Raises :class:`ModelNotFoundError` (:class:`MissingHubFile` when
    the repo has no such file) in one line, within ``HUB_TIMEOUT_S`` when the hub cannot be reached."""
    from huggingface_hub import hf_hub_download

    cached = cached_hub_file(repo_id, filename)
    if cached is not None:
        return cached
    check_hub_file(repo_id, filename, kind)
    try:
        return Path(hf_hub_download(repo_id, filename))
    except Exception as error:  # the connection dropped, the disk is full...
        raise ModelNotFoundError(
            f"{kind.name} weights {repo_id}/{filename}: the download failed ({_one_line(error)}); run it again "
            f"(it resumes), or point {kind.option} at a local copy"
        ) from None


def check_hub_file(repo_id: str, filename: str, kind: ModelKind) -> None:
    """Raise :class:`ModelNotFoundError` unless ``filename`` of ``repo_id`` is cached or can be downloaded
    now: one metadata request without retries, so an unreachable hub fails at once."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError

    if cached_hub_file(repo_id, filename) is not None:
        return
    where = f"{repo_id}/{filename}"
    if constants.HF_HUB_OFFLINE:
        raise ModelNotFoundError(
            f"{kind.name} weights {where} are not in the Hugging Face cache and HF_HUB_OFFLINE is set; {_fix(kind)}"
        )
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, filename), timeout=HUB_TIMEOUT_S)
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"{kind.name} model {repo_id!r}: no such repository on {constants.ENDPOINT} (or it is private or gated); "
            f"check the name given to {kind.option}"
        ) from None
    except EntryNotFoundError:
        raise MissingHubFile(
            f"{kind.name} model {repo_id!r} has no file {filename!r} on the hub; check the name given to {kind.option}"
        ) from None
    except HfHubHTTPError as error:
        raise ModelNotFoundError(
            f"{kind.name} weights {where}: the hub refused ({_one_line(error)}); {_fix(kind)}"
        ) from None
    except Exception as error:  # the HTTP client's connection and timeout errors
        raise ModelNotFoundError(
            f"{kind.name} weights {where} are not in the Hugging Face cache and {constants.ENDPOINT} cannot be "
            f"reached ({_one_line(error)}); {_fix(kind)}"
        ) from None


def _fix(kind: ModelKind) -> str:
    from huggingface_hub import constants

    return (
        f"download it with `ntt models download` where the hub can be reached and copy {constants.HF_HUB_CACHE}, "
        f"or point {kind.option} at a local copy"
    )


def cached_hub_file(repo_id: str, filename: str) -> Path | None:
    """``filename`` of ``repo_id`` in the Hugging Face cache (latest cached revision of main), or None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo_id, filename)
    except ValueError:  # not a valid repo id
        return None
    return Path(cached) if isinstance(cached, str) else None


def hub_folder(repo_id: str, kind: ModelKind) -> Path:
    """The cached snapshot folder of a transformers repo: ``config.json`` and its safetensors weights
    (one ``model.safetensors``, or an index and its shards), downloaded when missing."""
    hub_file(repo_id, CONFIG_NAME, kind)  # first: a missing repo fails before any large download
    try:
        hub_file(repo_id, WEIGHTS_NAME, kind)
    except MissingHubFile:
        try:
            index = hub_file(repo_id, SHARDS_INDEX_NAME, kind)
        except MissingHubFile:
            raise MissingHubFile(
                f"{kind.name} model {repo_id!r} has no {WEIGHTS_NAME} on the hub (pickled weights such as "
                f"pytorch_model.bin are never loaded); choose another model with {kind.option}"
            ) from None
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            hub_file(repo_id, shard, kind)
    # Looked up again: a weights download of a newer revision lands in a new snapshot folder, which
    # the config cached from an older one is not in.
    return hub_file(repo_id, CONFIG_NAME, kind).parent


# ---------------------------------------------------------------------------------------------
# Strict loading of transformers folders


def load_pretrained(model_class, folder: str | Path, kind: ModelKind):
    """``model_class.from_pretrained(folder)`` (float32, eval mode, CPU), refused unless the folder holds
    a model of one of ``kind.model_types`` whose safetensors weights fill the model exactly."""
    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise ModelNotFoundError(
            f"{kind.name} model '{folder}' could not be loaded from a local directory (no {CONFIG_NAME}). "
            f"Point {kind.option} at a folder written by save_pretrained ({CONFIG_NAME} and {WEIGHTS_NAME}), "
            "at Meta's original checkpoint file, or give a short name or hub id"
        )
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise CheckpointError(f"{config_path}: not a JSON config ({_one_line(error)})") from None
    if model_type not in kind.model_types:
        raise CheckpointError(
            f"{folder} holds a {model_type!r} model, not {kind.name} ({' or '.join(map(repr, kind.model_types))}); "
            f"point {kind.option} at a {kind.name} model"
        )
    _check_safetensors(folder, kind)
    with _quiet_transformers():
        try:
            model, info = model_class.from_pretrained(
                folder, use_safetensors=True, output_loading_info=True, ignore_mismatched_sizes=True
            )
        except (OSError, ValueError, RuntimeError, TypeError, KeyError) as error:
            raise CheckpointError(f"{folder}: {kind.name} weights cannot be loaded ({_one_line(error)})") from None
    problems = [
        f"{len(keys)} {label} ({_listing(sorted(keys))})"
        for label, keys in (
            ("missing", info["missing_keys"]),
            (
                "with the wrong shape",
                [f"{key} {tuple(got)} (model: {tuple(want)})" for key, got, want in info["mismatched_keys"]],
            ),
            ("with no place in the model", info["unexpected_keys"]),
        )
        if keys
    ]
    if problems:
        raise CheckpointError(
            f"{folder} does not fit {model_class.__name__}: tensors {'; '.join(problems)}. "
            f"The checkpoint is damaged or of another architecture; point {kind.option} at a complete {kind.name} model"
        )
    return model.float().eval()


def _check_safetensors(folder: Path, kind: ModelKind) -> None:
    """Every ``*.safetensors`` file of ``folder`` opens (its header covers the whole file)."""
    from safetensors import SafetensorError, safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"{folder}: no {WEIGHTS_NAME} (pickled weights such as pytorch_model.bin are never loaded); "
            f"save the model with save_pretrained (safetensors) or point {kind.option} at another copy"
        )
    for path in files:
        try:
            with safe_open(path, "pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise CheckpointError(
                f"{path} is truncated or not a safetensors file ({_one_line(error)}); download it again "
                f"(`ntt models download`) or point {kind.option} at another copy"
            ) from None


@contextlib.contextmanager
def _quiet_transformers():
    """Hide transformers' own loading report and type warnings: :func:`load_pretrained` says what matters."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__
