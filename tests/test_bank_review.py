"""The review loop: leave-one-out threshold suggestions (against a naive loop), adding and removing
bank entries, negative references, thumbnails, and the same on real datasets with the
deterministic stand-in models (ntt_core.standins), so scores mean something."""

import base64
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fiftyone_scenes import field_documents, scenes_dataset
from PIL import Image

from ntt_core.bank_review import POSITIVE_OUTLINE, leave_one_out, suggest_thresholds, thumbnail
from ntt_core.fiftyone import review
from ntt_core.fiftyone.bank_runs import delete_memory_bank, load_memory_bank, memory_bank_info
from ntt_core.fiftyone.building import build_dataset_memory_bank
from ntt_core.fiftyone.fields import FiftyOneAdapterError
from ntt_core.fiftyone.predictions import segment_by_reference
from ntt_core.matching import score_classes
from ntt_core.memory_bank import MemoryBank, MemoryBankError, add_references, remove_references
from ntt_core.reference_descriptors import DescribedReferences
from ntt_core.references import ReferenceInstance
from ntt_core.settings import Settings
from ntt_core.standins import ColourStatsEncoder, ConnectedRegionSegmenter

SETTINGS = Settings(points_per_side=12)  # every scene instance gets a prompt inside it


def random_bank(classes=("a", "b", "c"), shots=(3, 1, 4), negatives=(2, 0, 1), dim=6, seed=0) -> MemoryBank:
    generator = torch.Generator().manual_seed(seed)
    index, negative = [], []
    for i, (p, n) in enumerate(zip(shots, negatives)):
        index += [i] * (p + n)
        negative += [False] * p + [True] * n
    rows = len(index)
    return MemoryBank(
        classes=list(classes),
        descriptors=torch.randn(rows, dim, generator=generator) + 0.5,
        class_index=torch.tensor(index),
        negative=torch.tensor(negative),
        reference_ids=[f"r{i}" for i in range(rows)],
        image_ids=[f"i{i // 2}" for i in range(rows)],
        encoder_id="e",
        encoder_fingerprint="f",
        encoder_input_size=28,
        settings={"negative_temperature": 0.5},
    )


def without(bank: MemoryBank, row: int) -> MemoryBank:
    keep = torch.arange(len(bank.reference_ids)) != row
    return MemoryBank(
        classes=bank.classes,
        descriptors=bank.descriptors[keep],
        class_index=bank.class_index[keep],
        negative=bank.negative[keep],
        reference_ids=[r for i, r in enumerate(bank.reference_ids) if i != row],
        image_ids=[r for i, r in enumerate(bank.image_ids) if i != row],
        encoder_id=bank.encoder_id,
        encoder_fingerprint=bank.encoder_fingerprint,
        encoder_input_size=bank.encoder_input_size,
    )


@pytest.mark.parametrize("negatives", [(0, 0, 0), (2, 0, 1)])
def test_leave_one_out_equals_scoring_each_reference_against_a_bank_without_it(negatives):
    bank = random_bank(negatives=negatives)
    loo = leave_one_out(bank)
    for row in range(len(bank.reference_ids)):
        own = int(bank.class_index[row])
        if bank.negative[row] or bank.counts()[bank.classes[own]] < 2:
            assert torch.isnan(loo.scores[row]) and loo.top_class[row] == -1
            continue
        rest = without(bank, row)
        unit = F.normalize(bank.descriptors[row : row + 1], dim=1)
        prototypes, (negatives, has_negative) = rest.prototypes(), rest.negative_prototypes()
        only = slice(own, own + 1)
        own_score, _ = score_classes(unit, prototypes[only], negatives[only], has_negative[only], 0.5)  # bank's T
        _, top = score_classes(unit, prototypes, negatives, has_negative, 0.5)
        assert float(loo.scores[row]) == pytest.approx(float(own_score), abs=1e-5)
        assert int(loo.top_class[row]) == int(top)
    assert torch.isfinite(loo.scores).sum() == 7  # classes a and c: 3 + 4 positive references


def test_threshold_suggestion_is_the_floored_10th_percentile_of_each_class():
    bank = random_bank()
    loo = leave_one_out(bank)
    suggestions = suggest_thresholds(bank)
    for index, name in enumerate(bank.classes):
        rows = (bank.class_index == index) & ~bank.negative
        scores = loo.scores[rows].tolist()
        entry = suggestions[name]
        tops = [bank.classes[t] for t in loo.top_class[rows].tolist() if t not in (-1, index)]
        assert entry["confused"] == {other: tops.count(other) for other in tops}
        assert bool(entry["confused"]) == entry["note"].startswith("some references score higher for")
        assert entry["shots"] == bank.counts()[name] and entry["negatives"] == bank.counts(negative=True)[name]
        if len(scores) < 2:
            assert entry["threshold"] is None and entry["note"] == "needs 2 or more references"
        else:
            assert entry["scores"] == pytest.approx(scores)
            assert entry["threshold"] == np.floor(np.percentile(scores, 10) * 100) / 100
            assert min(scores) - 0.01 < entry["threshold"] <= np.percentile(scores, 10)


def test_adding_references_appends_shots_classes_and_negatives():
    bank = random_bank(negatives=(0, 0, 0))
    instances = [
        ReferenceInstance("b", reference_id="new-b"),
        ReferenceInstance("d", reference_id="new-d"),
        ReferenceInstance("a", reference_id="neg-a", negative=True),
        ReferenceInstance("e", reference_id="neg-e", negative=True),
        ReferenceInstance("a", reference_id="r0"),
    ]
    described = DescribedReferences(torch.arange(30.0).reshape(5, 6), instances, ["x", "y", "z", "w", "v"], [])
    grown, skipped = add_references(bank, described)
    assert grown.classes == ["a", "b", "c", "d"]
    assert grown.counts() == {"a": 3, "b": 2, "c": 4, "d": 1} and grown.counts(negative=True)["a"] == 1
    assert grown.reference_ids[-3:] == ["new-b", "new-d", "neg-a"] and grown.image_ids[-3:] == ["x", "y", "z"]
    assert torch.equal(grown.descriptors[-3:], described.descriptors[:3])
    assert torch.equal(grown.descriptors[: len(bank.reference_ids)], bank.descriptors)
    assert (grown.encoder_fingerprint, grown.settings) == (bank.encoder_fingerprint, bank.settings)
    assert [(s["reference_id"], s["reason"]) for s in skipped] == [
        ("neg-e", "class 'e' has no positive reference in this memory bank"),
        ("r0", "already a reference of this memory bank"),
    ]


def test_removing_references_drops_emptied_classes_with_their_negatives():
    bank = random_bank()  # b has 1 shot; a has 2 negatives
    smaller, removed, dropped = remove_references(bank, ["r0", "r5"])  # r5: the only shot of b
    assert removed == ["r0", "r5"] and dropped == ["b"]
    assert smaller.classes == ["a", "c"] and smaller.counts() == {"a": 2, "c": 4}
    assert smaller.counts(negative=True) == {"a": 2, "c": 1}
    assert smaller.descriptors.shape[0] == len(bank.reference_ids) - 2
    assert [smaller.classes[i] for i in smaller.class_index] == [
        bank.classes[int(i)] for i, rid in zip(bank.class_index, bank.reference_ids) if rid not in ("r0", "r5")
    ]
    only_a = ["r0", "r1", "r2"]
    smaller, removed, dropped = remove_references(bank, only_a)
    assert dropped == ["a"] and removed == only_a + ["r3", "r4"]  # a's negatives go with it


@pytest.mark.bad_input
def test_removing_every_reference_is_refused():
    bank = random_bank()
    with pytest.raises(MemoryBankError, match="would leave the memory bank empty: delete the bank instead"):
        remove_references(bank, bank.reference_ids)


def decode(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))


def test_thumbnail_is_the_reference_crop_with_the_mask_outline():
    image = np.full((100, 200, 3), 90, dtype=np.uint8)
    mask = np.zeros((100, 200), dtype=bool)
    mask[40:60, 100:140] = True
    image[mask] = (0, 0, 255)
    pixels = decode(thumbnail(image, (100, 40, 140, 60), mask, size=48))
    assert pixels.shape == (48, 48, 3)  # square crop of side 40 x 1.2, scaled to 48
    outline = np.all(pixels == POSITIVE_OUTLINE, axis=2)
    assert outline[24, 4] and outline[24, 43] and not outline[24, 24]  # mask edges, not its inside
    assert tuple(pixels[24, 24]) == (0, 0, 255) and tuple(pixels[2, 24]) == (90, 90, 90)
    box_only = decode(thumbnail(image, (100, 40, 140, 60), None, size=48))
    assert np.array_equal(np.all(box_only == POSITIVE_OUTLINE, axis=2), outline)  # a rectangle: the box


# --- on datasets, with the stand-in models ---


@pytest.fixture(scope="module")
def models():
    return ConnectedRegionSegmenter(), ColourStatsEncoder()


@pytest.fixture
def dataset(tmp_path):
    dataset = scenes_dataset(tmp_path, count=4, size=(72, 88), seed=3)
    yield dataset
    dataset.delete()


def predictions(dataset, field: str = "pred") -> list:
    return dataset.values(f"{field}.detections", unwind=True)


def test_accepted_prediction_becomes_a_shot_that_points_at_it(dataset, models):
    gt_before = field_documents(dataset, "gt")
    build_dataset_memory_bank(dataset, "bank", "gt", *models)
    segment_by_reference(dataset, "bank", "pred", *models, settings=SETTINGS)
    bank = load_memory_bank(dataset, "bank")
    references = set(bank.reference_ids)
    accepted = next(d for d in predictions(dataset) if d.reference_id in references)
    sample_id = dataset.select_labels(ids=[accepted.id], fields="pred").first().id

    report = review.add_to_memory_bank(dataset, "bank", {"pred": [accepted.id]}, models[1])
    grown = load_memory_bank(dataset, "bank")
    assert report["added"] == 1 and report["skipped"] == []
    assert grown.counts()[accepted.label] == bank.counts()[accepted.label] + 1 == report["counts"][accepted.label]
    assert (grown.reference_ids[-1], grown.image_ids[-1]) == (accepted.id, sample_id)
    assert grown.classes[int(grown.class_index[-1])] == accepted.label and not grown.negative[-1]
    assert torch.equal(grown.descriptors[:-1], bank.descriptors)
    info = memory_bank_info(dataset, "bank")
    assert info["gt_field"] == "gt" and info["tag"] == "reference"  # where the bank came from is kept
    assert info["review"] == [{"action": "add", "negative": False, "fields": ["pred"], "count": 1}]
    assert sample_id in info["reference_sample_ids"]
    located = review.locate_references(dataset, grown)[accepted.id]
    assert (located.sample_id, located.field) == (sample_id, "pred")

    overview = review.bank_overview(dataset, "bank")
    thumbs = next(c for c in overview["classes"] if c["name"] == accepted.label)["thumbnails"]
    assert {"reference_id": accepted.id, "sample_id": sample_id, "field": "pred", "negative": False} in [
        {k: t[k] for k in ("reference_id", "sample_id", "field", "negative")} for t in thumbs
    ]
    assert overview["not_found"] == 0
    assert field_documents(dataset, "gt") == gt_before


@pytest.mark.bad_input
def test_adding_a_reference_twice_or_with_another_encoder_is_refused(dataset, models):
    build_dataset_memory_bank(dataset, "bank", "gt", *models)
    reference = load_memory_bank(dataset, "bank").reference_ids[0]
    with pytest.raises(FiftyOneAdapterError, match="nothing added to memory bank 'bank': .*already a reference"):
        review.add_to_memory_bank(dataset, "bank", {"gt": [reference]}, models[1])
    with pytest.raises(MemoryBankError, match="this memory bank was built with encoder 'standin:colour-stats'"):
        review.add_to_memory_bank(dataset, "bank", {"gt": [reference]}, ColourStatsEncoder(hue_bins=6))
    with pytest.raises(FiftyOneAdapterError, match="none of the selected labels is in 'gt'"):
        review.add_to_memory_bank(dataset, "bank", {"gt": ["0" * 24]}, models[1])


def test_matched_reference_of_a_prediction_is_the_tagged_label(dataset, models):
    build_dataset_memory_bank(dataset, "bank", "gt", *models)
    segment_by_reference(dataset, "bank", "pred", *models, settings=SETTINGS)
    tagged = {d.id: d.label for s in dataset for d in s.gt.detections if "reference" in d.tags}
    for prediction in predictions(dataset)[:3]:
        match = review.matched_reference(dataset, "pred", prediction.id)
        sample = dataset.select_labels(ids=[match["reference_id"]], fields="gt").first()
        assert match["reference_id"] == prediction.reference_id and match["reference_id"] in tagged
        assert match == {
            "bank_key": "bank",
            "reference_id": prediction.reference_id,
            "sample_id": sample.id,
            "field": "gt",
            "class_name": tagged[prediction.reference_id],
            "negative": False,
        }


@pytest.mark.bad_input
def test_matched_reference_errors_say_why(dataset, models):
    build_dataset_memory_bank(dataset, "bank", "gt", *models)
    segment_by_reference(dataset, "bank", "pred", *models, settings=SETTINGS)
    prediction = predictions(dataset)[0]
    gt_label = dataset.first().gt.detections[0]
    with pytest.raises(FiftyOneAdapterError, match="'gt' was not written by Segment by reference"):
        review.matched_reference(dataset, "gt", gt_label.id)
    with pytest.raises(FiftyOneAdapterError, match=f"no label '{gt_label.id}' in 'pred'"):
        review.matched_reference(dataset, "pred", gt_label.id)
    review.remove_from_memory_bank(dataset, "bank", [prediction.reference_id])
    with pytest.raises(FiftyOneAdapterError, match=f"reference '{prediction.reference_id}' is no longer in memory"):
        review.matched_reference(dataset, "pred", prediction.id)
    delete_memory_bank(dataset, "bank")
    with pytest.raises(FiftyOneAdapterError, match="memory bank 'bank', which produced 'pred', no longer exists"):
        review.matched_reference(dataset, "pred", prediction.id)


def test_tagged_references_are_removed_and_the_rest_kept(dataset, models):
    build_dataset_memory_bank(dataset, "bank", "gt", *models)
    bank = load_memory_bank(dataset, "bank")
    gt_label = dataset.select_labels(ids=[bank.reference_ids[0]], fields="gt")
    gt_label.tag_labels(review.REMOVE_TAG, label_fields="gt")
    tagged = review.tagged_labels(dataset, review.REMOVE_TAG)
    assert tagged == {"gt": [bank.reference_ids[0]]}
    report = review.remove_from_memory_bank(dataset, "bank", tagged["gt"])
    smaller = load_memory_bank(dataset, "bank")
    assert report["removed"] == [bank.reference_ids[0]]
    assert len(smaller.reference_ids) == len(bank.reference_ids) - 1
    assert smaller.reference_ids == bank.reference_ids[1:]
    with pytest.raises(FiftyOneAdapterError, match="none of the 1 label\\(s\\) is a reference of memory bank 'bank'"):
        review.remove_from_memory_bank(dataset, "bank", tagged["gt"])


def test_a_negative_reference_damps_its_look_alike_and_nothing_else(dataset, models):
    build_dataset_memory_bank(dataset, "bank", "gt", *models, classes=["disc"])
    segment_by_reference(dataset, "bank", "before", *models, settings=SETTINGS)
    discs = [(s.id, d) for s in dataset for d in s.gt.detections if d.label == "disc"]
    before = {(s.id, tuple(d.bounding_box)): d for s in dataset for d in s.before.detections}
    true = {key for key, d in before.items() if any(key[0] == sid and box_iou(d, g) > 0.8 for sid, g in discs)}
    look_alike = max((d for key, d in before.items() if key not in true), key=lambda d: d.confidence)
    assert true and look_alike.confidence > 0.05  # a square, star or background region taken for a disc

    dataset.select_labels(ids=[look_alike.id], fields="before").tag_labels(review.NEGATIVE_TAG, label_fields="before")
    tagged = review.tagged_labels(dataset, review.NEGATIVE_TAG)
    assert tagged == {"before": [look_alike.id]}
    report = review.add_to_memory_bank(dataset, "bank", tagged, models[1], negative=True)
    assert report["negative_counts"] == {"disc": 1} and report["counts"] == {"disc": 1}
    segment_by_reference(dataset, "bank", "after", *models, settings=SETTINGS)
    after = {(s.id, tuple(d.bounding_box)): d for s in dataset for d in s.after.detections}
    assert after.keys() == before.keys()  # damping changes scores, never masks

    key = next(k for k, d in before.items() if d.id == look_alike.id)
    assert after[key].confidence < 0.5 * look_alike.confidence
    for k in true:
        assert after[k].confidence == pytest.approx(before[k].confidence)  # s_neg < s_pos: no damping
    assert all(after[k].confidence <= before[k].confidence + 1e-6 for k in before)


def box_iou(a, b) -> float:
    ax, ay, aw, ah = a.bounding_box
    bx, by, bw, bh = b.bounding_box
    w = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    h = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    return w * h / (aw * ah + bw * bh - w * h)


def test_a_prediction_record_under_the_earlier_run_key_is_still_read(dataset, models):
    from ntt_core.fiftyone.predictions import prediction_record

    record = {"pred_field": "old", "bank_key": "references"}
    dataset.register_run("ntt_predictions_old", dataset.init_run(method="ntt_predictions", **record))
    assert {k: prediction_record(dataset, "old")[k] for k in record} == record
