"""The memory bank: one DINOv2 descriptor per reference instance, class prototypes from them,
a pickle-free file format (safetensors + a JSON manifest), building a bank from described
references, and its edits (adding and removing references)."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .errors import NttError
from .models import FeatureEncoder, PromptSegmenter
from .reference_descriptors import DescribedReferences, describe_references
from .references import InvalidReferenceError, ReferenceImage, skipped_instance
from .settings import Settings

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
TENSORS_NAME = "features.safetensors"


class MemoryBankError(NttError):
    """A memory bank file or payload that is invalid, tampered with, or made for other models."""


@dataclass
class MemoryBank:
    """Per-instance descriptors of the references and everything needed to score against them."""

    classes: list[str]
    descriptors: torch.Tensor  # [R, C] float32, mask-weighted mean patch features (not normalised)
    class_index: torch.Tensor  # [R] int64, index into ``classes``
    negative: torch.Tensor  # [R] bool, negative references
    reference_ids: list[str]
    image_ids: list[str]
    encoder_id: str
    encoder_fingerprint: str
    encoder_input_size: int
    segmenter_id: str = ""
    settings: dict = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)  # {"reference_id", "class_name", "reason"}

    def __post_init__(self) -> None:
        rows = self.descriptors.shape[0]
        if not (len(self.class_index) == len(self.negative) == len(self.reference_ids) == len(self.image_ids) == rows):
            raise MemoryBankError("memory bank fields disagree on the number of references")
        if rows and (int(self.class_index.min()) < 0 or int(self.class_index.max()) >= len(self.classes)):
            raise MemoryBankError("memory bank class index out of range")
        missing = [
            name for i, name in enumerate(self.classes) if not bool(((self.class_index == i) & ~self.negative).any())
        ]
        if missing:
            raise MemoryBankError(f"classes without a positive reference: {', '.join(missing)}")

    @property
    def feature_dim(self) -> int:
        return int(self.descriptors.shape[1])

    def counts(self, negative: bool = False) -> dict[str, int]:
        """References per class (positive ones, or negative ones)."""
        chosen = self.class_index[self.negative == negative]
        return {name: int((chosen == i).sum()) for i, name in enumerate(self.classes)}

    def prototypes(self) -> torch.Tensor:
        """``[K, C]`` L2-normalised mean of each class's positive descriptors (two-step aggregation)."""
        return _class_means(self.descriptors, self.class_index, ~self.negative, len(self.classes))

    def negative_prototypes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[K, C]`` normalised mean of each class's negative descriptors and ``[K]`` bool: has any."""
        present = torch.zeros(len(self.classes), dtype=torch.bool)
        present[self.class_index[self.negative]] = True
        return _class_means(self.descriptors, self.class_index, self.negative, len(self.classes)), present

    def check_encoder(self, encoder: FeatureEncoder) -> None:
        """Raise :class:`MemoryBankError` unless ``encoder`` is the one the bank was built with."""
        if encoder.fingerprint != self.encoder_fingerprint or encoder.input_size != self.encoder_input_size:
            raise MemoryBankError(
                f"this memory bank was built with encoder {self.encoder_id!r} at {self.encoder_input_size} px "
                f"(weights {self.encoder_fingerprint}), but the encoder in use is {encoder.model_id!r} at "
                f"{encoder.input_size} px (weights {encoder.fingerprint}); rebuild the bank or use that encoder"
            )

    # --- serialisation: safetensors bytes + a JSON manifest, never pickle ---

    def to_payload(self) -> dict:
        """A JSON-able dict: the manifest plus the safetensors bytes in base64."""
        blob = save_safetensors(
            {
                "descriptors": self.descriptors.float().contiguous(),
                "class_index": self.class_index.long().contiguous(),
                "negative": self.negative.to(torch.uint8).contiguous(),
            }
        )
        return {"manifest": self._manifest(blob), "tensors": base64.b64encode(blob).decode("ascii")}

    @classmethod
    def from_payload(cls, payload: dict) -> MemoryBank:
        try:
            blob = base64.b64decode(payload["tensors"], validate=True)
            manifest = payload["manifest"]
        except (KeyError, TypeError, ValueError) as error:
            raise MemoryBankError(f"not a memory bank payload: {error}") from None
        return cls._from_parts(manifest, blob, "payload")

    def save(self, directory: str | Path) -> Path:
        """Write ``manifest.json`` and ``features.safetensors`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload = self.to_payload()
        (directory / TENSORS_NAME).write_bytes(base64.b64decode(payload["tensors"]))
        (directory / MANIFEST_NAME).write_text(json.dumps(payload["manifest"], indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> MemoryBank:
        directory = Path(directory)
        manifest_path, tensors_path = directory / MANIFEST_NAME, directory / TENSORS_NAME
        if not manifest_path.is_file() or not tensors_path.is_file():
            raise MemoryBankError(f"{directory}: not a memory bank (needs {MANIFEST_NAME} and {TENSORS_NAME})")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise MemoryBankError(f"{manifest_path}: unreadable manifest ({error})") from None
        return cls._from_parts(manifest, tensors_path.read_bytes(), str(directory))

    def _manifest(self, blob: bytes) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "sha256": hashlib.sha256(blob).hexdigest(),
            "classes": list(self.classes),
            "reference_ids": list(self.reference_ids),
            "image_ids": list(self.image_ids),
            "feature_dim": self.feature_dim,
            "encoder_id": self.encoder_id,
            "encoder_fingerprint": self.encoder_fingerprint,
            "encoder_input_size": self.encoder_input_size,
            "segmenter_id": self.segmenter_id,
            "settings": dict(self.settings),
            "counts": self.counts(),
            "skipped": list(self.skipped),
        }

    @classmethod
    def _from_parts(cls, manifest: dict, blob: bytes, where: str) -> MemoryBank:
        if not isinstance(manifest, dict):
            raise MemoryBankError(f"{where}: the manifest is not a JSON object")
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise MemoryBankError(
                f"{where}: memory bank schema version {version!r} is not supported (this version reads {SCHEMA_VERSION}); rebuild the bank"
            )
        if hashlib.sha256(blob).hexdigest() != manifest.get("sha256"):
            raise MemoryBankError(f"{where}: checksum mismatch, the memory bank is truncated or was modified")
        try:
            tensors = load_safetensors(blob)
            descriptors, class_index = tensors["descriptors"], tensors["class_index"]
            negative = tensors["negative"].bool()
            rows = len(manifest["reference_ids"])
            if descriptors.dtype != torch.float32 or descriptors.shape != (rows, manifest["feature_dim"]):
                raise MemoryBankError(
                    f"{where}: descriptors have shape {tuple(descriptors.shape)} / {descriptors.dtype}"
                )
            if class_index.dtype != torch.int64 or class_index.shape != (rows,) or negative.shape != (rows,):
                raise MemoryBankError(f"{where}: class index or negative flags have the wrong shape or type")
            if not torch.isfinite(descriptors).all():
                raise MemoryBankError(f"{where}: descriptors hold NaN or infinite values")
            return cls(
                classes=list(manifest["classes"]),
                descriptors=descriptors,
                class_index=class_index,
                negative=negative,
                reference_ids=list(manifest["reference_ids"]),
                image_ids=list(manifest["image_ids"]),
                encoder_id=str(manifest["encoder_id"]),
                encoder_fingerprint=str(manifest["encoder_fingerprint"]),
                encoder_input_size=int(manifest["encoder_input_size"]),
                segmenter_id=str(manifest.get("segmenter_id", "")),
                settings=dict(manifest.get("settings", {})),
                skipped=list(manifest.get("skipped", [])),
            )
        except (KeyError, TypeError) as error:
            raise MemoryBankError(f"{where}: manifest is missing or mistypes {error}") from None
        except Exception as error:  # safetensors raises its own error types on corrupt bytes
            if isinstance(error, MemoryBankError):
                raise
            raise MemoryBankError(f"{where}: unreadable tensors ({error})") from None


def _class_means(
    descriptors: torch.Tensor, class_index: torch.Tensor, chosen: torch.Tensor, classes: int
) -> torch.Tensor:
    """``[K, C]`` L2-normalised mean of the chosen descriptors of each class (zeros where none)."""
    sums = torch.zeros(classes, descriptors.shape[1], dtype=torch.float32)
    sums.index_add_(0, class_index[chosen], descriptors[chosen].float())
    counts = torch.bincount(class_index[chosen], minlength=classes).clamp(min=1).unsqueeze(1)
    return F.normalize(sums / counts, dim=1)


def build_memory_bank(
    references: Iterable[ReferenceImage],
    encoder: FeatureEncoder,
    segmenter: PromptSegmenter | None = None,
    settings: Settings | None = None,
    classes: Sequence[str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> MemoryBank:
    """Describe every reference instance with the encoder and collect them into a bank.

    Box-only references get their mask from the segmenter's box prompt. Instances that cannot
    be used (see :func:`.reference_descriptors.describe_references`) are skipped and listed in ``bank.skipped``; a
    class left without any positive reference is an error. ``classes`` fixes the class order
    (default: order of first appearance). ``progress`` is called with the number of reference
    images done.
    """
    settings = settings or Settings()
    described = describe_references(references, encoder, segmenter, settings, progress)
    instances, skipped = described.instances, described.skipped
    positive_classes = list(dict.fromkeys(instance.class_name for instance in instances if not instance.negative))
    class_names = list(classes) if classes is not None else positive_classes
    missing = [name for name in class_names if name not in positive_classes]
    if missing or not class_names:
        reasons = "; ".join(f"{s['reference_id'] or '?'} ({s['class_name']}): {s['reason']}" for s in skipped)
        what = f"no usable reference for class(es) {', '.join(missing)}" if missing else "no usable reference at all"
        raise InvalidReferenceError(what + (f". Skipped: {reasons}" if reasons else ""))
    kept = [row for row, instance in enumerate(instances) if instance.class_name in class_names]
    lookup = {name: i for i, name in enumerate(class_names)}
    return MemoryBank(
        classes=class_names,
        descriptors=described.descriptors[kept] if kept else torch.zeros(0, 0),
        class_index=torch.tensor([lookup[instances[row].class_name] for row in kept], dtype=torch.int64),
        negative=torch.tensor([instances[row].negative for row in kept], dtype=torch.bool),
        reference_ids=[instances[row].reference_id for row in kept],
        image_ids=[described.image_ids[row] for row in kept],
        encoder_id=encoder.model_id,
        encoder_fingerprint=encoder.fingerprint,
        encoder_input_size=encoder.input_size,
        segmenter_id=segmenter.model_id if segmenter is not None else "",
        settings=settings.to_dict(),
        skipped=skipped,
    )


# --- editing a bank ---


def add_references(bank: MemoryBank, described: DescribedReferences) -> tuple[MemoryBank, list[dict]]:
    """``bank`` plus the described instances (positive ones as new shots, a new class appended
    when needed; negative ones as negative references of their class).

    The descriptors must come from the bank's encoder (check with ``bank.check_encoder`` before
    describing). Instances already in the bank, and negative ones of a class without positive
    references in the bank, are skipped. Returns the new bank and the skipped instances
    ``{"reference_id", "class_name", "reason"}``.
    """
    if len(described.instances) and described.descriptors.shape[1] != bank.feature_dim:
        raise MemoryBankError(
            f"new descriptors have {described.descriptors.shape[1]} channels, the bank {bank.feature_dim}: "
            "describe them with the bank's encoder"
        )
    classes, known, skipped, rows = list(bank.classes), set(bank.reference_ids), [], []
    for row, instance in enumerate(described.instances):
        reason = ""
        if instance.reference_id in known:
            reason = "already a reference of this memory bank"
        elif instance.negative and instance.class_name not in bank.classes:
            reason = f"class '{instance.class_name}' has no positive reference in this memory bank"
        if reason:
            skipped.append(skipped_instance(instance, reason))
            continue
        if instance.class_name not in classes:
            classes.append(instance.class_name)
        known.add(instance.reference_id)
        rows.append(row)
    added = [described.instances[row] for row in rows]
    lookup = {name: i for i, name in enumerate(classes)}
    grown = replace(  # same encoder, segmenter, settings and skipped list
        bank,
        classes=classes,
        descriptors=torch.cat([bank.descriptors, described.descriptors[rows].reshape(len(rows), bank.feature_dim)]),
        class_index=torch.cat(
            [bank.class_index, torch.tensor([lookup[i.class_name] for i in added], dtype=torch.int64)]
        ),
        negative=torch.cat([bank.negative, torch.tensor([i.negative for i in added], dtype=torch.bool)]),
        reference_ids=bank.reference_ids + [i.reference_id for i in added],
        image_ids=bank.image_ids + [described.image_ids[row] for row in rows],
    )
    return grown, skipped


def remove_references(bank: MemoryBank, reference_ids: Iterable[str]) -> tuple[MemoryBank, list[str], list[str]]:
    """``bank`` without the given references. A class left without positive references is
    dropped with its negative ones. Returns the new bank, the ids removed and the classes dropped;
    raises :class:`MemoryBankError` when nothing would be left."""
    wanted = set(reference_ids)
    keep = torch.tensor([rid not in wanted for rid in bank.reference_ids], dtype=torch.bool)
    positive_left = torch.bincount(bank.class_index[keep & ~bank.negative], minlength=len(bank.classes))
    dropped = [name for i, name in enumerate(bank.classes) if positive_left[i] == 0]
    classes = [name for name in bank.classes if name not in dropped]
    if not classes:
        raise MemoryBankError("removing these references would leave the memory bank empty: delete the bank instead")
    keep &= positive_left[bank.class_index] > 0
    remap = torch.full((len(bank.classes),), -1, dtype=torch.int64)
    remap[positive_left > 0] = torch.arange(len(classes))
    rows = torch.nonzero(keep).flatten().tolist()
    removed = [rid for rid, kept in zip(bank.reference_ids, keep.tolist()) if not kept]
    smaller = replace(
        bank,
        classes=classes,
        descriptors=bank.descriptors[keep],
        class_index=remap[bank.class_index[keep]],
        negative=bank.negative[keep],
        reference_ids=[bank.reference_ids[row] for row in rows],
        image_ids=[bank.image_ids[row] for row in rows],
    )
    return smaller, removed, dropped
