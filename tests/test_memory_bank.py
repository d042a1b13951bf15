"""Reference descriptors, prototypes and the memory-bank file format."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ntt_core.geometry import reference_crop_box
from ntt_core.memory_bank import MemoryBank, MemoryBankError, build_memory_bank
from ntt_core.references import InvalidReferenceError, ReferenceImage, ReferenceInstance


class PixelEncoder:
    """A transparent encoder: patch features are the mean colour of each patch (plus a constant)."""

    model_id, fingerprint, input_size, grid_size = "pixels", "pixels-v1", 28, 4
    device = torch.device("cpu")

    def encode(self, images):
        pooled = F.avg_pool2d(images, 7)  # [B, 3, 4, 4]
        return torch.cat([pooled, torch.ones_like(pooled[:, :1])], dim=1)


def test_crop_box_is_a_square_with_context_clipped_to_the_image():
    assert reference_crop_box((40, 40, 60, 50), (100, 100), 0.2) == (38, 33, 62, 57)  # side 24 around (50, 45)
    assert reference_crop_box((0, 0, 20, 10), (100, 100), 0.2) == (0, 0, 22, 17)  # clipped at the corner


def test_descriptor_is_the_mask_weighted_mean_over_top_left_patch_pixels():
    image = np.zeros((28, 28, 3), dtype=np.uint8)
    image[:, :14] = (200, 0, 0)
    image[:, 14:] = (0, 0, 100)
    mask = np.zeros((28, 28), dtype=bool)
    mask[:, 10:] = True  # covers the top-left pixel of patch columns 2 and 3 only
    reference = ReferenceImage(image, [ReferenceInstance("thing", mask=mask, box=(0, 0, 28, 28), reference_id="r")])
    bank = build_memory_bank([reference], PixelEncoder())
    # legacy nearest picks pixels 0, 7, 14, 21 of each axis: columns 14 and 21 are in the mask -> blue patches only
    expected = torch.tensor([0.0, 0.0, 100 / 255, 1.0])
    assert torch.allclose(bank.descriptors[0], expected, atol=1e-4)


def test_prototypes_average_instances_first_then_normalise():
    bank = MemoryBank(
        classes=["a", "b"],
        descriptors=torch.tensor([[10.0, 0.0], [0.0, 1.0], [3.0, 4.0], [0.0, -5.0]]),
        class_index=torch.tensor([0, 0, 1, 1]),
        negative=torch.tensor([False, False, False, True]),
        reference_ids=["1", "2", "3", "4"],
        image_ids=["x", "x", "y", "y"],
        encoder_id="e",
        encoder_fingerprint="f",
        encoder_input_size=28,
    )
    prototypes = bank.prototypes()
    assert torch.allclose(prototypes[0], F.normalize(torch.tensor([5.0, 0.5]), dim=0))
    assert torch.allclose(prototypes[1], torch.tensor([0.6, 0.8]))  # the negative is not averaged in
    negatives, present = bank.negative_prototypes()
    assert present.tolist() == [False, True] and torch.allclose(negatives[1], torch.tensor([0.0, -1.0]))
    assert bank.counts() == {"a": 2, "b": 1} and bank.counts(negative=True) == {"a": 0, "b": 1}


def make_bank():
    image = (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)
    mask = np.zeros((40, 50), dtype=bool)
    mask[5:30, 10:40] = True
    references = [
        ReferenceImage(image, [ReferenceInstance("cat", mask=mask, reference_id="r1")], image_id="img1"),
        ReferenceImage(image, [ReferenceInstance("dog", mask=~mask, reference_id="r2")], image_id="img2"),
    ]
    return build_memory_bank(references, PixelEncoder())


def test_save_and_load_round_trip(tmp_path):
    bank = make_bank()
    loaded = MemoryBank.load(bank.save(tmp_path / "bank"))
    assert (
        loaded.classes == ["cat", "dog"]
        and loaded.reference_ids == ["r1", "r2"]
        and loaded.image_ids == ["img1", "img2"]
    )
    assert torch.equal(loaded.descriptors, bank.descriptors)
    assert MemoryBank.from_payload(json.loads(json.dumps(bank.to_payload()))).classes == ["cat", "dog"]


@pytest.mark.bad_input
def test_tampered_truncated_or_foreign_banks_are_refused(tmp_path):
    directory = make_bank().save(tmp_path / "bank")
    tensors = directory / "features.safetensors"
    original = tensors.read_bytes()
    tensors.write_bytes(original[:-7])
    with pytest.raises(MemoryBankError, match="checksum mismatch"):
        MemoryBank.load(directory)
    tensors.write_bytes(original)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MemoryBankError, match="schema version 99 is not supported"):
        MemoryBank.load(directory)
    with pytest.raises(MemoryBankError, match="not a memory bank"):
        MemoryBank.load(tmp_path)


@pytest.mark.bad_input
def test_bank_from_another_encoder_is_refused():
    bank = make_bank()

    class Other(PixelEncoder):
        fingerprint = "other"

    with pytest.raises(MemoryBankError, match="built with encoder 'pixels'"):
        bank.check_encoder(Other())
    bank.check_encoder(PixelEncoder())


@pytest.mark.bad_input
def test_empty_masks_are_skipped_and_a_class_without_references_is_an_error():
    image = np.zeros((30, 30, 3), dtype=np.uint8)
    good = np.zeros((30, 30), dtype=bool)
    good[5:20, 5:20] = True
    references = [
        ReferenceImage(
            image,
            [
                ReferenceInstance("cat", mask=good, reference_id="ok"),
                ReferenceInstance("cat", mask=np.zeros((30, 30)), reference_id="empty"),
                ReferenceInstance("dog", mask=np.zeros((30, 30)), reference_id="empty-dog"),
            ],
        )
    ]
    with pytest.raises(
        InvalidReferenceError, match=r"no usable reference for class\(es\) dog.*empty-dog \(dog\): mask is empty"
    ):
        build_memory_bank(references, PixelEncoder(), classes=["cat", "dog"])
    bank = build_memory_bank(references, PixelEncoder())
    assert bank.classes == ["cat"] and [s["reference_id"] for s in bank.skipped] == ["empty", "empty-dog"]
    with pytest.raises(InvalidReferenceError, match="no usable reference at all"):
        build_memory_bank([], PixelEncoder())
