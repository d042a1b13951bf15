"""Our SAM2 / DINOv2 wrappers against the transformers models' own forward paths."""

import copy

import pytest
import torch

from ntt_core.models import ModelNotFoundError, load_encoder, load_segmenter, normalize


@pytest.fixture(scope="module")
def models(tiny_models):
    sam2_dir, dinov2_dir = tiny_models
    return load_segmenter(str(sam2_dir), device="cpu"), load_encoder(str(dinov2_dir), device="cpu")


def test_sizes_come_from_the_configs(models):
    segmenter, encoder = models
    assert (segmenter.input_size, segmenter.mask_size) == (128, 32)
    assert (encoder.input_size, encoder.grid_size) == (56, 4)


def test_segmenter_matches_sam2_forward_when_the_no_memory_embedding_is_added(tiny_models):
    loaded = load_segmenter(str(tiny_models[0]), device="cpu", add_no_memory_embedding=True)
    segmenter = copy.deepcopy(loaded)  # the loaded model is shared with the other tests: change a copy
    model = segmenter.model
    torch.manual_seed(0)
    with torch.no_grad():
        model.no_memory_embedding.normal_()  # zeros in a fresh model: make it matter
    images = torch.rand(2, 3, 128, 128)
    points = torch.rand(2, 5, 2) * 128
    logits, iou = segmenter.segment_points(segmenter.embed(images), points)
    with torch.no_grad():
        reference = model(pixel_values=normalize(images), input_points=points[:, :, None], multimask_output=True)
    assert torch.allclose(logits, reference.pred_masks, atol=1e-5)
    assert torch.allclose(iou, reference.iou_scores, atol=1e-6)

    plain = load_segmenter(str(tiny_models[0]), device="cpu")  # the paper's path: no embedding added
    features, with_embedding = plain.embed(images), segmenter.embed(images)
    added = model.no_memory_embedding.reshape(1, -1, 1, 1)
    assert torch.allclose(features.embeddings + added, with_embedding.embeddings, atol=1e-5)
    assert torch.equal(features.high_resolution[0], with_embedding.high_resolution[0])


def test_box_prompts_match_sam2_forward(models):
    segmenter, _ = models
    images = torch.rand(1, 3, 128, 128)
    boxes = torch.tensor([[[10.0, 20.0, 90.0, 100.0], [0.0, 0.0, 50.0, 40.0]]])
    logits, iou = segmenter.segment_boxes(segmenter.embed(images), boxes)
    model = segmenter.model
    with torch.no_grad():
        model_no_memory = model.no_memory_embedding.clone()
        model.no_memory_embedding.zero_()
        reference = model(pixel_values=normalize(images), input_boxes=boxes, multimask_output=False)
        model.no_memory_embedding.copy_(model_no_memory)
    assert torch.allclose(logits, reference.pred_masks[:, :, 0], atol=1e-5)
    assert torch.allclose(iou, reference.iou_scores[:, :, 0], atol=1e-6)


def test_encoder_returns_final_layernorm_patch_tokens_without_cls(models):
    _, encoder = models
    images = torch.rand(2, 3, 56, 56)
    features = encoder.encode(images)
    with torch.no_grad():
        tokens = encoder.model(pixel_values=normalize(images)).last_hidden_state
    assert features.shape == (2, 32, 4, 4)
    assert torch.allclose(features.flatten(2).transpose(1, 2), tokens[:, 1:], atol=1e-6)


def test_loading_the_same_weights_from_two_places_gives_the_same_fingerprint(tiny_models, tmp_path):
    import shutil

    copy = shutil.copytree(tiny_models[1], tmp_path / "copy")
    assert (
        load_encoder(str(copy), device="cpu").fingerprint == load_encoder(str(tiny_models[1]), device="cpu").fingerprint
    )


@pytest.mark.bad_input
def test_missing_model_names_the_model_and_the_option(tmp_path):
    """The session is offline (HF_HUB_OFFLINE, empty cache): the paper's SAM2 is Meta's file, not there."""
    with pytest.raises(
        ModelNotFoundError,
        match=r"SAM2 weights facebook/sam2-hiera-large/sam2_hiera_large\.pt are not in the Hugging Face cache and "
        r"HF_HUB_OFFLINE is set; download it with `ntt models download`.*--sam2",
    ):
        load_segmenter("sam2-large", device="cpu")
    with pytest.raises(ModelNotFoundError, match=r"DINOv2 model .*nowhere.*--dinov2"):
        load_encoder(str(tmp_path / "nowhere"), device="cpu")


def test_wrappers_of_one_source_keep_their_own_device_and_dtype(tiny_models):
    """Cached per (source, device, dtype): a bf16 wrapper does not change the fp32 one, and a wrapper on
    a second device (PyTorch's "meta" device: the CPU is the only real one here) gets its own module
    instead of moving the one the first wrapper uses."""
    sam2_dir = str(tiny_models[0])
    fp32 = load_segmenter(sam2_dir, device="cpu", dtype="auto")
    images, points = torch.rand(1, 3, 128, 128), torch.rand(1, 4, 2) * 128
    before = fp32.segment_points(fp32.embed(images), points)
    bf16 = load_segmenter(sam2_dir, device="cpu", dtype="bfloat16")
    elsewhere = load_segmenter(sam2_dir, device="meta")
    assert load_segmenter(sam2_dir, device="cpu") is fp32  # cached
    assert (fp32.dtype, bf16.dtype, elsewhere.dtype) == (torch.float32, torch.bfloat16, torch.float32)
    assert bf16.model is fp32.model and elsewhere.model is not fp32.model
    assert {p.device.type for p in fp32.model.parameters()} == {"cpu"} and fp32.device == torch.device("cpu")
    assert {p.device.type for p in elsewhere.model.parameters()} == {"meta"}
    assert elsewhere.fingerprint == fp32.fingerprint  # the same weights, read before the move
    after = fp32.segment_points(fp32.embed(images), points)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert not torch.equal(bf16.segment_points(bf16.embed(images), points)[0], before[0])  # bf16 autocast


def test_a_cached_wrappers_module_is_shared_after_other_models_were_loaded(tiny_models, tmp_path):
    """A second dtype of a source still gets the first wrapper's module after four other sources
    were loaded in between: the module cache holds at least as much as the wrapper caches."""
    import shutil

    first = load_encoder(str(tiny_models[1]), device="cpu")
    for i in range(4):
        load_encoder(str(shutil.copytree(tiny_models[1], tmp_path / f"copy{i}")), device="cpu")
    assert load_encoder(str(tiny_models[1]), device="cpu", dtype="bfloat16").model is first.model


def test_cuda_devices_are_named_with_their_index(monkeypatch):
    """The names "cuda" and "cuda:0" are one device, hence one cache entry (one copy of the weights on the GPU);
    torch.cuda is replaced by a one-GPU double, as this machine has none."""
    from ntt_core.models import choose_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert choose_device("cuda") == choose_device("cuda:0") == choose_device("auto") == torch.device("cuda", 0)
    with pytest.raises(RuntimeError, match=r"^device 'cuda:1' was requested but there are 1 GPU\(s\)$"):
        choose_device("cuda:1")


def test_auto_dtype_is_float32_everywhere():
    from ntt_core.models import choose_dtype

    for device in ("cpu", "cuda", "mps"):
        assert choose_dtype(torch.device(device), "auto") == choose_dtype(torch.device(device), None) == torch.float32
    assert choose_dtype(torch.device("cpu"), "bf16") == torch.bfloat16


def test_bfloat16_path_runs_and_stays_close_to_float32(tiny_models):
    """bf16 autocast (when asked) exercised on CPU: outputs are float32 and near the fp32 ones."""
    sam2_dir, dinov2_dir = tiny_models
    fp32 = load_segmenter(str(sam2_dir), device="cpu"), load_encoder(str(dinov2_dir), device="cpu")
    bf16 = (
        load_segmenter(str(sam2_dir), device="cpu", dtype="bfloat16"),
        load_encoder(str(dinov2_dir), device="cpu", dtype="bfloat16"),
    )
    torch.manual_seed(0)
    images, points = torch.rand(1, 3, 128, 128), torch.rand(1, 6, 2) * 128
    (logits, iou), (logits_bf16, iou_bf16) = (s.segment_points(s.embed(images), points) for s, _ in (fp32, bf16))
    features, features_bf16 = (
        e.encode(torch.rand(1, 3, 56, 56, generator=torch.Generator().manual_seed(1))) for _, e in (fp32, bf16)
    )
    assert logits_bf16.dtype == iou_bf16.dtype == features_bf16.dtype == torch.float32
    assert torch.corrcoef(torch.stack([logits.flatten(), logits_bf16.flatten()]))[0, 1] > 0.99
    assert torch.corrcoef(torch.stack([features.flatten(), features_bf16.flatten()]))[0, 1] > 0.99
    assert (iou - iou_bf16).abs().max() < 0.05
