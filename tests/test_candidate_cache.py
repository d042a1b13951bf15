"""The candidate cache: a run from the cache equals an uncached run after any bank edit, on the
stand-ins and on tiny random models loaded from disk; bounded, atomic, and safe with bad folders,
damaged entries and changed images."""

import copy
import errno
import hashlib
import inspect
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ntt_core import candidate_cache, frames, matching, models, predictor, prompt_decoder, proposals
from ntt_core.candidate_cache import CacheWarning, CandidateCache, DescribedCandidates, reading_margin
from ntt_core.input_rules import InputError
from ntt_core.memory_bank import build_memory_bank
from ntt_core.models import load_encoder, load_segmenter
from ntt_core.predictor import Predictor
from ntt_core.references import ReferenceImage, ReferenceInstance
from ntt_core.settings import Settings
from ntt_core.standins import ColourStatsEncoder, ConnectedRegionSegmenter
from ntt_core.synthetic import make_dataset

STANDIN_SETTINGS = Settings(points_per_side=6)
TINY_SETTINGS = Settings(points_per_side=4, prompt_batch_size=8, sam_iou_threshold=0.0)
#: PIPELINE_VERSION -> digest of the source of the code that computes candidates and descriptors.
PIPELINE_SOURCES = {
    1: "3fc0828086889d4c7d6587ffe7ec446b6981e47c9a638ca039c067be263c1795",
    2: "194cc81d4ba7f5fae9eae4685912344f335b53dd27a735aaa9a1cca75aa2b096",  # decoder buffer reuse, cache hit count
    3: "99b8638d5d247eed1cc66d1439eceb42d36ca7f10242ea96ce987bfea77af31e",  # final attention for the 5 tokens read
    4: "4755a8e3b82f97120fd054675fca9c8c6d3e7d7f0b891693e196dcf8a716b9bf",  # the decoder in pieces of a few prompts on CPU
}


def candidate_code_digest() -> str:
    parts = [
        frames.image_tensor,
        frames.square_frame,
        frames.bicubic,
        proposals,  # point grid, propose, best of three
        prompt_decoder,
        models.normalize,
        models.autocast,
        models.Sam2Segmenter,
        models.Dinov2Encoder,
        matching.interpolation_matrix,
        matching._interpolation_matrix_cpu,
        matching.pool_features,
        predictor.Predictor.candidates,
        predictor.Predictor._describe_candidates,
        predictor.describe,
    ]
    return hashlib.sha256("\n".join(inspect.getsource(part) for part in parts).encode()).hexdigest()


def test_pipeline_version_changes_with_the_candidate_code():
    assert PIPELINE_SOURCES.get(candidate_cache.PIPELINE_VERSION) == candidate_code_digest(), (
        "the code that computes candidates or descriptors changed: bump PIPELINE_VERSION in "
        f"ntt_core/candidate_cache.py and record {candidate_code_digest()} for it in PIPELINE_SOURCES"
    )


# --- banks and their edits ---


def standin_setup():
    scenes = make_dataset(4, seed=3, size=(64, 80))
    refs = [
        (i, ReferenceInstance(name, mask=mask, reference_id=f"s{i}-{j}"))
        for i, scene in enumerate(scenes)
        for j, (name, mask) in enumerate(zip(scene.class_names, scene.masks))
    ]
    images = [scene.image for scene in scenes]
    return ConnectedRegionSegmenter(input_size=96), ColourStatsEncoder(input_size=56, grid_size=7), images, refs


def tiny_setup(tiny_models):
    rng = np.random.default_rng(0)
    images = [(rng.random((70 + 9 * i, 90 - 7 * i, 3)) * 255).astype(np.uint8) for i in range(4)]
    refs = []
    for i, image in enumerate(images):
        for j, name in enumerate(("cat", "dog", "cat", "bird")):
            mask = np.zeros(image.shape[:2], dtype=bool)
            mask[5 + 10 * j : 30 + 10 * j, 4 + 12 * j : 40 + 8 * j] = True
            refs.append((i, ReferenceInstance(name, mask=mask, reference_id=f"t{i}-{j}")))
    segmenter = load_segmenter(str(tiny_models[0]), device="cpu")
    encoder = load_encoder(str(tiny_models[1]), device="cpu")
    return segmenter, encoder, images, refs


def bank_edits(refs):
    """(base, {edit: edited}) reference lists: base from images 0 and 1 without one class."""
    classes = sorted({instance.class_name for _, instance in refs})
    new_class = classes[-1]
    base = [(i, r) for i, r in refs if i < 2 and r.class_name != new_class]
    counts = {name: sum(r.class_name == name for _, r in base) for name in classes}
    twice = next(name for name, count in counts.items() if count >= 2)
    added = next((i, r) for i, r in refs if i >= 2 and r.class_name in counts and counts[r.class_name])
    other = next((i, r) for i, r in refs if r.class_name == new_class)
    negative = (other[0], ReferenceInstance(twice, mask=other[1].mask, reference_id="negative", negative=True))
    removed = next(k for k, (_, r) in enumerate(base) if r.class_name == twice)
    return base, {
        "added reference": base + [added],
        "added negative": base + [negative],
        "removed reference": base[:removed] + base[removed + 1 :],
        "new class": base + [(i, r) for i, r in refs if r.class_name == new_class],
    }


def bank_of(refs, images, encoder, settings):
    by_image = {}
    for i, instance in refs:
        by_image.setdefault(i, []).append(instance)
    references = [ReferenceImage(images[i], instances, image_id=str(i)) for i, instances in by_image.items()]
    return build_memory_bank(references, encoder, settings=settings)


def assert_same(got, expected):
    assert len(got) == len(expected)
    assert got.labels_as_names == expected.labels_as_names
    assert np.array_equal(got.boxes, expected.boxes)
    assert all(np.array_equal(a, b) for a, b in zip(got.masks, expected.masks))
    for name in ("scores", "semantic_scores", "sam_iou", "merge_factors"):
        assert np.allclose(getattr(got, name), getattr(expected, name), rtol=0, atol=1e-6), name
    assert got.reference_ids == expected.reference_ids


def no_segmenting(segmenter, monkeypatch):
    """From here on the segmenter refuses to embed: results must come from the cache."""

    def refuse(images):
        raise AssertionError("the segmenter ran although every image is cached")

    monkeypatch.setattr(segmenter, "embed", refuse)


@pytest.mark.parametrize("edit", ["added reference", "added negative", "removed reference", "new class"])
@pytest.mark.parametrize("kind", ["standins", "tiny"])
def test_cached_run_after_a_bank_edit_equals_an_uncached_run(kind, edit, tiny_models, tmp_path, monkeypatch):
    segmenter, encoder, images, refs = standin_setup() if kind == "standins" else tiny_setup(tiny_models)
    settings = STANDIN_SETTINGS if kind == "standins" else TINY_SETTINGS
    base, edits = bank_edits(refs)
    cache = CandidateCache(tmp_path / "cache")
    first = Predictor(segmenter, encoder, bank_of(base, images, encoder, settings), settings, cache=cache)
    first.predict(images)
    assert len(list((tmp_path / "cache").iterdir())) == len(images)
    edited = bank_of(edits[edit], images, encoder, settings)
    expected = Predictor(segmenter, encoder, edited, settings).predict(images)
    assert sum(len(e) for e in expected) > 0
    no_segmenting(segmenter, monkeypatch)
    got = Predictor(segmenter, encoder, edited, settings, cache=CandidateCache(tmp_path / "cache")).predict(images)
    for g, e in zip(got, expected):
        assert_same(g, e)


def test_the_prompt_batch_is_not_part_of_the_key(tmp_path, monkeypatch):
    segmenter, encoder, images, refs = standin_setup()
    bank = bank_of(refs, images, encoder, STANDIN_SETTINGS)
    Predictor(
        segmenter, encoder, bank, STANDIN_SETTINGS.replace(prompt_batch_size=5), CandidateCache(tmp_path)
    ).predict(images[:1])
    no_segmenting(segmenter, monkeypatch)
    Predictor(
        segmenter, encoder, bank, STANDIN_SETTINGS.replace(prompt_batch_size=7), CandidateCache(tmp_path)
    ).predict(images[:1])


def test_candidate_settings_are_part_of_the_key(tmp_path):
    segmenter, encoder, images, refs = standin_setup()
    bank = bank_of(refs, images, encoder, STANDIN_SETTINGS)
    for settings in (STANDIN_SETTINGS, STANDIN_SETTINGS.replace(points_per_side=5)):
        Predictor(segmenter, encoder, bank, settings, CandidateCache(tmp_path)).predict(images[:1])
    other_model = ColourStatsEncoder(input_size=56, grid_size=7, hue_bins=8)
    bank = bank_of(refs, images, other_model, STANDIN_SETTINGS)
    Predictor(segmenter, other_model, bank, STANDIN_SETTINGS, CandidateCache(tmp_path)).predict(images[:1])
    assert len(list(tmp_path.iterdir())) == 3


def test_the_weights_digest_covers_every_tensor(tiny_models):
    segmenter = load_segmenter(str(tiny_models[0]), device="cpu")
    changed = copy.deepcopy(segmenter)  # the loaded model is shared: change a copy
    with torch.no_grad():
        next(iter(changed.model.vision_encoder.parameters())).add_(1.0)
    assert changed.fingerprint_of(changed.model) == segmenter.fingerprint  # the short fingerprint misses it
    assert candidate_cache.model_digest(changed) != candidate_cache.model_digest(segmenter)


def test_a_smaller_mask_size_than_stored_recomputes(tmp_path):
    """Masks shrunk below SAM2's mask size read further around each box: the entry stored for a large
    size is not enough and is recomputed, with the same result as without the cache."""
    segmenter, encoder, images, refs = standin_setup()
    bank = bank_of(refs, images, encoder, STANDIN_SETTINGS)
    small = [(17, 13)]
    assert reading_margin(segmenter.mask_size, small[0]) > reading_margin(segmenter.mask_size, images[0].shape[:2])
    cached = Predictor(segmenter, encoder, bank, STANDIN_SETTINGS, CandidateCache(tmp_path))
    cached.predict(images[:1])
    got = cached.predict(images[:1], small)[0]
    expected = Predictor(segmenter, encoder, bank, STANDIN_SETTINGS).predict(images[:1], small)[0]
    assert_same(got, expected)
    again = Predictor(segmenter, encoder, bank, STANDIN_SETTINGS, CandidateCache(tmp_path)).predict(images[:1], small)
    assert_same(again[0], expected)


def test_least_recently_used_entries_go_first(tmp_path):
    segmenter, encoder, images, refs = standin_setup()
    bank = bank_of(refs, images, encoder, STANDIN_SETTINGS)
    cache = CandidateCache(tmp_path)
    run = Predictor(segmenter, encoder, bank, STANDIN_SETTINGS, cache)
    run.predict(images[:3])
    paths = [tmp_path / f"{candidate_cache.image_key(run.cache_context, image)}.safetensors" for image in images[:3]]
    for seconds, path in zip((1, 2, 3), paths):
        os.utime(path, (seconds, seconds))  # used in image order, long ago
    cache.max_bytes = cache.size_bytes() - 1
    run.predict(images[:1])  # a hit: image 0 is the most recent now
    cache.evict()
    assert [path.exists() for path in paths] == [True, False, True]
    assert cache.size_bytes() <= cache.max_bytes


def test_partial_writes_left_by_a_dead_process_are_removed(tmp_path):
    segmenter, encoder, images, refs = standin_setup()
    bank = bank_of(refs, images, encoder, STANDIN_SETTINGS)
    abandoned, under_way = tmp_path / ".part-dead.safetensors", tmp_path / ".part-live.safetensors"
    abandoned.write_bytes(b"half an entry")
    under_way.write_bytes(b"being written")
    os.utime(abandoned, (1, 1))
    Predictor(segmenter, encoder, bank, STANDIN_SETTINGS, CandidateCache(tmp_path)).predict(images[:1])
    assert not abandoned.exists() and under_way.exists()
    assert len(list(tmp_path.iterdir())) == 2


def concurrent_entry(writer: int, index: int) -> DescribedCandidates:
    """Writer ``writer``'s candidates for key ``index``: boxes of positive logits on -1 (stored exactly)."""
    generator = torch.Generator().manual_seed(1000 * writer + index)
    logits = torch.full((6, 32, 32), -1.0)
    for n in range(6):
        x, y = (int(v) for v in torch.randint(0, 24, (2,), generator=generator))
        logits[n, y : y + 8, x : x + 8] = torch.rand(8, 8, generator=generator) + 0.1
    return DescribedCandidates(logits, torch.rand(6, generator=generator), torch.rand(6, 16, generator=generator))


CONCURRENT_WRITER = """
import sys
sys.path.insert(0, sys.argv[1])
from test_candidate_cache import concurrent_entry
from ntt_core.candidate_cache import CandidateCache
cache = CandidateCache(sys.argv[2], max_bytes=int(sys.argv[4]))
writer = int(sys.argv[3])
for round in range(40):
    for index in range(4):
        cache.store(f"k{index}", concurrent_entry(writer, index), (64, 64))
"""


def test_two_processes_writing_and_evicting_never_let_a_reader_see_half_an_entry(tmp_path):
    entry_bytes = sum(t.numel() * t.element_size() for t in candidate_cache._pack(concurrent_entry(1, 0), 2).values())
    limit = 3 * entry_bytes  # below the four keys: the writers evict each other's entries all along
    cache = CandidateCache(tmp_path, max_bytes=limit)
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_WRITER, str(Path(__file__).parent), str(tmp_path), str(w), str(limit)]
        )
        for w in (1, 2)
    ]
    hits = reads = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CacheWarning)
        while any(w.poll() is None for w in writers) or reads == 0:
            for index in range(4):
                found, reads = cache.load(f"k{index}", (64, 64), torch.device("cpu")), reads + 1
                if found is not None:
                    hits += 1
                    assert any(
                        all(
                            torch.equal(a, b)
                            for a, b in zip(found.__dict__.values(), concurrent_entry(w, index).__dict__.values())
                        )
                        for w in (1, 2)
                    ), f"key k{index} read as neither writer's entry"
    assert [w.wait() for w in writers] == [0, 0]
    assert not [str(c.message) for c in caught if issubclass(c.category, CacheWarning)]
    assert hits > 0, (hits, reads)
    assert not list(tmp_path.glob(".part-*")) and cache.size_bytes() <= limit


# --- bad input ---


@pytest.mark.bad_input
@pytest.mark.parametrize("limit", [0, -5, 1.5, True])
def test_a_limit_below_one_byte_is_refused(tmp_path, limit):
    with pytest.raises(InputError, match="cache size limit must be a positive number of bytes"):
        CandidateCache(tmp_path, max_bytes=limit)


@pytest.mark.bad_input
def test_a_cache_folder_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "cache"
    path.write_text("not a folder")
    with pytest.raises(InputError, match="is a file, not a folder"):
        CandidateCache(path)
    assert path.read_text() == "not a folder"


def run_twice_with_one_warning(cache, tmp_path):
    segmenter, encoder, images, refs = standin_setup()
    bank = bank_of(refs, images, encoder, STANDIN_SETTINGS)
    expected = Predictor(segmenter, encoder, bank, STANDIN_SETTINGS).predict(images[:2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = Predictor(segmenter, encoder, bank, STANDIN_SETTINGS, cache())
        got = run.predict(images[:1]) + run.predict(images[1:2])
    for g, e in zip(got, expected):
        assert_same(g, e)
    messages = [str(w.message) for w in caught if issubclass(w.category, CacheWarning)]
    assert len(messages) == 1, messages
    return messages[0]


@pytest.mark.bad_input
def test_an_unwritable_cache_folder_runs_uncached_and_says_so_once(tmp_path):
    (tmp_path / "file").write_text("")
    message = run_twice_with_one_warning(lambda: CandidateCache(tmp_path / "file" / "cache"), tmp_path)
    assert "cannot be written" in message and "going on without storing results" in message


@pytest.mark.bad_input
def test_a_full_cache_folder_runs_uncached_and_says_so_once(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(candidate_cache, "save_file", full)  # the disk, not the code under test
    message = run_twice_with_one_warning(lambda: CandidateCache(tmp_path), tmp_path)
    assert "No space left on device" in message
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


@pytest.mark.bad_input
@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "empty"])
def test_a_damaged_entry_is_recomputed_with_a_warning(tmp_path, damage):
    segmenter, encoder, images, refs = standin_setup()
    bank = bank_of(refs, images, encoder, STANDIN_SETTINGS)
    expected = Predictor(segmenter, encoder, bank, STANDIN_SETTINGS, CandidateCache(tmp_path)).predict(images[:1])
    (entry,) = tmp_path.iterdir()
    data = bytearray(entry.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "flipped byte":
        data[-3] ^= 0x40
    else:
        data = b""
    entry.write_bytes(bytes(data))
    with pytest.warns(CacheWarning, match=f"candidate cache entry {entry} is damaged"):
        got = Predictor(segmenter, encoder, bank, STANDIN_SETTINGS, CandidateCache(tmp_path)).predict(images[:1])
    assert_same(got[0], expected[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)  # stored again, sound
        Predictor(segmenter, encoder, bank, STANDIN_SETTINGS, CandidateCache(tmp_path)).predict(images[:1])


@pytest.mark.bad_input
def test_an_entry_of_another_schema_is_ignored(tmp_path, monkeypatch):
    segmenter, encoder, images, refs = standin_setup()
    bank = bank_of(refs, images, encoder, STANDIN_SETTINGS)
    run = Predictor(segmenter, encoder, bank, STANDIN_SETTINGS, CandidateCache(tmp_path))
    expected = run.predict(images[:1])[0]
    (entry,) = tmp_path.iterdir()
    key = entry.name.removesuffix(".safetensors")
    found = run.cache.load(key, images[0].shape[:2], torch.device("cpu"))
    monkeypatch.setattr(candidate_cache, "SCHEMA", 99)
    run.cache.store(key, found, images[0].shape[:2])  # same name, a schema this code does not know
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        assert run.cache.load(key, images[0].shape[:2], torch.device("cpu")) is None
        assert_same(run.predict(images[:1])[0], expected)


@pytest.mark.bad_input
def test_an_image_changed_on_disk_is_recomputed(tmp_path):
    segmenter, encoder, images, refs = standin_setup()
    bank = bank_of(refs, images, encoder, STANDIN_SETTINGS)
    path = tmp_path / "image.png"
    cache = CandidateCache(tmp_path / "cache")
    Image.fromarray(images[0]).save(path)
    Predictor(segmenter, encoder, bank, STANDIN_SETTINGS, cache).predict_paths([path])
    Image.fromarray(images[1]).save(path)
    got = Predictor(segmenter, encoder, bank, STANDIN_SETTINGS, cache).predict_paths([path])[0]
    assert_same(got, Predictor(segmenter, encoder, bank, STANDIN_SETTINGS).predict(images[1:2])[0])
    assert len(list((tmp_path / "cache").iterdir())) == 2
