"""The whole pipeline with tiny random-weight models loaded from disk."""

import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

from ntt_core.images import ImageError
from ntt_core.memory_bank import build_memory_bank
from ntt_core.models import load_encoder, load_segmenter
from ntt_core.predictor import Predictor
from ntt_core.references import ReferenceImage, ReferenceInstance
from ntt_core.settings import Settings
from ntt_core.stages import observe

SETTINGS = Settings(points_per_side=3, prompt_batch_size=4, sam_iou_threshold=0.0)


@pytest.fixture(scope="module")
def predictor(tiny_models):
    segmenter = load_segmenter(str(tiny_models[0]), device="cpu")
    encoder = load_encoder(str(tiny_models[1]), device="cpu")
    rng = np.random.default_rng(0)
    image = (rng.random((90, 110, 3)) * 255).astype(np.uint8)
    mask = np.zeros((90, 110), dtype=bool)
    mask[10:60, 20:70] = True
    references = [
        ReferenceImage(
            image,
            [
                ReferenceInstance("cat", mask=mask, reference_id="cat-1"),
                ReferenceInstance("dog", box=(60, 30, 105, 85), reference_id="dog-1"),
            ],
            image_id="ref",
        )
    ]
    bank = build_memory_bank(references, encoder, segmenter, SETTINGS)
    return Predictor(segmenter, encoder, bank, SETTINGS)


def images():
    rng = np.random.default_rng(1)
    return [(rng.random(shape) * 255).astype(np.uint8) for shape in [(70, 90, 3), (120, 64, 3), (64, 64, 3)]]


def test_instances_are_consistent(predictor):
    for image, result in zip(images(), predictor.predict(images())):
        assert result.image_size == image.shape[:2]
        assert len(result) == len(result.boxes) == len(result.scores) == len(result.reference_ids)
        assert set(result.class_names) == {"cat", "dog"}
        assert (np.diff(result.scores) <= 0).all()  # best first
        for mask, (x0, y0, x1, y1) in zip(result.masks, result.boxes):
            assert mask.shape == (y1 - y0, x1 - x0) and mask.any()
            assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()  # tight box
        assert np.allclose(result.scores, result.semantic_scores * result.merge_factors, atol=1e-6)
        assert set(result.reference_ids) <= {"cat-1", "dog-1"}


def test_batched_equals_one_image_at_a_time(predictor):
    batched = predictor.predict(images())
    for image, together in zip(images(), batched):
        alone = predictor.predict([image])[0]
        assert np.array_equal(alone.boxes, together.boxes)
        assert np.allclose(alone.scores, together.scores, atol=1e-5)
        assert all(np.array_equal(a, b) for a, b in zip(alone.masks, together.masks))


def test_nothing_found_is_an_empty_result(predictor):
    strict = Predictor(predictor.segmenter, predictor.encoder, predictor.bank, SETTINGS.replace(sam_iou_threshold=1.0))
    result = strict.predict(images()[:1])[0]
    assert len(result) == 0 and result.image_size == (70, 90)


@pytest.mark.bad_input
def test_images_smaller_than_a_patch_are_refused_and_reported_per_file(predictor, tmp_path):
    from PIL import Image

    with pytest.raises(ImageError, match=r"image 0: 5x3 px is smaller than one 14-px encoder patch"):
        predictor.predict([np.zeros((3, 5, 3), dtype=np.uint8)])
    good, tiny, broken = tmp_path / "good.png", tmp_path / "tiny.png", tmp_path / "broken.jpg"
    Image.fromarray(images()[0]).save(good)
    Image.fromarray(np.zeros((1, 1, 3), dtype=np.uint8)).save(tiny)
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    results = predictor.predict_paths([good, tiny, broken])
    assert len(results[0].image_size) == 2
    assert isinstance(results[1], ImageError) and "smaller than one 14-px encoder patch" in str(results[1])
    assert isinstance(results[2], ImageError) and "unreadable or corrupt image" in str(results[2])


def test_grayscale_rgba_and_16_bit_images_are_accepted(predictor):
    rng = np.random.default_rng(2)
    gray = (rng.random((40, 50)) * 255).astype(np.uint8)
    rgba = np.dstack([np.stack([gray] * 3, axis=2), np.full((40, 50), 255, np.uint8)])
    deep = gray.astype(np.uint16) * 257
    results = predictor.predict([gray, rgba, deep])
    assert np.array_equal(results[0].boxes, results[1].boxes) and np.array_equal(results[0].boxes, results[2].boxes)
    assert torch.is_tensor(predictor.prototypes)


def test_prompt_batch_size_changes_memory_not_results(predictor):
    """Prompts are decoded independently: one prompt at a time gives the same instances as all at once."""
    expected = predictor.predict(images())
    assert sum(len(result) for result in expected) > 0
    for prompt_batch_size in (1, 9):
        settings = SETTINGS.replace(prompt_batch_size=prompt_batch_size)
        other = Predictor(predictor.segmenter, predictor.encoder, predictor.bank, settings).predict(images())
        for a, b in zip(expected, other):
            assert np.array_equal(a.boxes, b.boxes) and a.reference_ids == b.reference_ids
            assert all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks))
            assert np.allclose(a.scores, b.scores, atol=1e-5)


def test_default_prompt_batch_is_the_papers_on_an_accelerator_and_64_on_cpu(predictor, monkeypatch):
    assert Settings().prompt_batch("cuda") == Settings().prompt_batch("mps") == 256
    assert Settings().prompt_batch("cpu") == 64
    assert Settings(prompt_batch_size=7).prompt_batch("cuda") == Settings(prompt_batch_size=7).prompt_batch("cpu") == 7
    segmenter, decoded = predictor.segmenter, []

    def counting(features, points, iou_threshold):
        decoded.append(points.shape[1])
        return type(segmenter).segment_best_points(segmenter, features, points, iou_threshold)

    monkeypatch.setattr(segmenter, "segment_best_points", counting)
    settings = SETTINGS.replace(points_per_side=9, prompt_batch_size=None)  # 81 prompts on this CPU predictor
    Predictor(segmenter, predictor.encoder, predictor.bank, settings).predict(images()[:1])
    assert decoded == [64, 17]


def test_every_stage_is_labelled_and_observing_changes_no_result(predictor, tmp_path):
    """The stage labels benchmarks/speed.py times (ntt_core.stages): each stage of an image once or
    more, the decoder once per prompt batch with its prompt count, in pipeline order."""
    paths = []
    for i, image in enumerate(images()[:2]):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(paths[-1])
    entered: list[tuple[str, int | None]] = []

    def hook(name, items):
        entered.append((name, items))
        return contextlib.nullcontext()

    with observe(hook):
        observed = predictor.predict_paths(paths)
    plain = predictor.predict_paths(paths)
    for a, b in zip(observed, plain):
        assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.scores, b.scores)
    names = [name for name, _ in entered]
    assert names[:2] == ["decode", "decode"]
    assert names[2:7] == ["preprocess", "sam2_encoder", "preprocess", "dinov2_encoder", "mask_postprocess"]
    decoded = [items for name, items in entered if name == "prompt_decoding"]
    assert decoded == [2 * 4, 2 * 4, 2 * 1]  # 2 images x 9 prompts, 4 at a time
    per_image = [items for name, items in entered if name == "mask_postprocess" and items is not None]
    assert len(per_image) == 2 and sum(per_image) > 0  # each image's candidates after the IoU filter
    assert {"matching", "nms", "merge"} <= set(names)


def test_predict_stream_yields_each_image_in_order_batch_by_batch(predictor, tmp_path, monkeypatch):
    from PIL import Image

    paths = []
    for i, image in enumerate([*images(), np.zeros((1, 1, 3), dtype=np.uint8), images()[0]]):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(paths[-1])
    batches, real = [], predictor.predict_paths
    monkeypatch.setattr(
        predictor, "predict_paths", lambda batch, **options: batches.append(batch) or real(batch, **options)
    )
    streamed = list(predictor.predict_stream(paths, 2, first_batch_size=1))
    assert [len(batch) for batch in batches] == [1, 2, 2]  # every image predicted once
    assert [index for index, _ in streamed] == [0, 1, 2, 3, 4]
    assert isinstance(streamed[3][1], ImageError) and "smaller than one 14-px encoder patch" in str(streamed[3][1])
    for (_, result), path in zip(streamed, paths):
        if not isinstance(result, ImageError):
            alone = real([path])[0]
            assert result.image_size == alone.image_size and np.array_equal(result.boxes, alone.boxes)

    asked = []
    stop_after_one = lambda: asked.append(True) or len(asked) > 1  # noqa: E731
    assert [index for index, _ in predictor.predict_stream(paths, 2, should_stop=stop_after_one)] == [0, 1]
    assert len(asked) == 2  # asked before each batch, none started after the answer

    sized = list(predictor.predict_stream(paths[:2], 2, sizes=[(140, 180), (240, 128)], exif_orientation=False))
    assert [result.image_size for _, result in sized] == [(140, 180), (240, 128)]
    assert list(predictor.predict_stream([], 2)) == []
