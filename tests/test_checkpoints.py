"""Weights loaded exactly: strict refusal of checkpoints that do not fill the model, the layouts the
default models are stored in, and the hub path (a stand-in hub on 127.0.0.1) behind ``ntt models``.

Tampered checkpoints go through ``load_segmenter`` / ``load_encoder``, the loaders the CLI, the plugin and
Python callers share; the CLI's and the plugin's one-line errors are tested in test_cli.py / test_plugin.py.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from standin_hub import COMMIT, StandinHub
from tiny_models import tampered, tiny_dinov2_config, tiny_sam2_config

from ntt_core import models
from ntt_core.checkpoints import CheckpointError, ModelNotFoundError
from ntt_core.cli import main
from ntt_core.models import DINOV2, SAM2, load_encoder, load_segmenter, normalize, resolve_model

# One module of each model whose tensors the tampering below renames, drops or reshapes.
PREFIXES = {"sam2": "mask_decoder.iou_prediction_head.", "dinov2": "encoder.layer.1."}


def _renamed(tensors, prefix):
    return {("renamed." + key if key.startswith(prefix) else key): value for key, value in tensors.items()}


def _dropped(tensors, prefix):
    return {key: value for key, value in tensors.items() if not key.startswith(prefix)}


def _extra(tensors, prefix):
    return {**tensors, "stray.weight": torch.zeros(3)}


def _reshaped(tensors, prefix):
    key = sorted(key for key in tensors if key.startswith(prefix))[0]
    return {**tensors, key: torch.zeros(tensors[key].shape[0] + 1, *tensors[key].shape[1:])}


def _expected(name: str, tensors, prefix: str) -> str:
    """The counts the error must state, as a regex."""
    count = sum(key.startswith(prefix) for key in tensors)
    return {
        "renamed": rf"tensors {count} missing \(.*; {count} with no place in the model \(renamed\.{re.escape(prefix)}",
        "dropped": rf"tensors {count} missing \({re.escape(prefix)}",
        "extra": r"tensors 1 with no place in the model \(stray\.weight\)",
        "reshaped": rf"tensors 1 with the wrong shape \({re.escape(prefix)}\S+ \(\d+",
    }[name]


@pytest.mark.bad_input
@pytest.mark.parametrize("model", ["sam2", "dinov2"])
@pytest.mark.parametrize("change", [_renamed, _dropped, _extra, _reshaped], ids=lambda f: f.__name__[1:])
def test_a_checkpoint_that_does_not_fill_the_model_is_refused_in_one_line(tiny_models, tmp_path, model, change):
    source = tiny_models[0] if model == "sam2" else tiny_models[1]
    folder = tampered(source, tmp_path / "tampered", lambda tensors: change(tensors, PREFIXES[model]))
    load = load_segmenter if model == "sam2" else load_encoder
    with pytest.raises(CheckpointError) as caught:
        load(str(folder), device="cpu")
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{folder} does not fit ")
    expected = _expected(change.__name__[1:], load_file(source / "model.safetensors"), PREFIXES[model])
    assert re.search(expected, message), message
    assert f"--{model} / {model}=" in message


def test_the_untampered_copies_load(tiny_models):
    """The control of the test above: the same folders load and run."""
    assert load_segmenter(str(tiny_models[0]), device="cpu").fingerprint
    assert load_encoder(str(tiny_models[1]), device="cpu").encode(torch.rand(1, 3, 56, 56)).shape == (1, 32, 4, 4)


# ---------------------------------------------------------------------------------------------
# The layouts the defaults are stored in


def hub_dinov2_keys(key: str) -> str:
    """Today's Dinov2Model key -> the key transformers' 2023 conversion (convert_dinov2_to_hf.py) wrote
    to facebook/dinov2-* (its safetensors copies keep the names)."""
    for new, old in (
        (".attention.q_proj.", ".attention.attention.query."),
        (".attention.k_proj.", ".attention.attention.key."),
        (".attention.v_proj.", ".attention.attention.value."),
        (".attention.o_proj.", ".attention.output.dense."),
        (".mlp.down_proj.", ".mlp.weights_out."),
    ):
        key = key.replace(new, old)
    return key


@pytest.mark.parametrize("swiglu", [False, True], ids=["vit-s-b-l", "vit-g"])
def test_dinov2_in_the_hub_layout_loads_every_weight_and_gives_the_same_features(tmp_path, swiglu):
    """facebook/dinov2-{small,base,large} (fc1/fc2 MLP) and -giant (SwiGLU: w12 -> weights_in, w3 ->
    weights_out): config.json of model type dinov2, model.safetensors with the conversion script's names."""
    from tiny_models import randomise
    from transformers import Dinov2Model

    config = tiny_dinov2_config()
    config.use_swiglu_ffn = swiglu
    original = Dinov2Model(config).eval()
    randomise(original, seed=3)
    tensors = {}
    for key, value in original.state_dict().items():
        if ".mlp.gate_proj." in key:  # SwiGLU's fused input projection: [gate; up] rows
            up = original.state_dict()[key.replace("gate_proj", "up_proj")]
            tensors[key.replace(".mlp.gate_proj.", ".mlp.weights_in.")] = torch.cat([value, up])
        elif ".mlp.up_proj." not in key:
            tensors[hub_dinov2_keys(key)] = value.clone().contiguous()
    assert "encoder.layer.0.attention.attention.query.weight" in tensors
    folder = tmp_path / "dinov2-hub"
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    hub_config = {  # the fields of a 2023 config.json (no fields added since)
        "architectures": ["Dinov2Model"],
        "model_type": "dinov2",
        "torch_dtype": "float32",
        "transformers_version": "4.31.0.dev0",
        **{name: getattr(config, name) for name in ("hidden_size", "num_hidden_layers", "num_attention_heads")},
        **{name: getattr(config, name) for name in ("mlp_ratio", "image_size", "patch_size", "use_swiglu_ffn")},
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "layerscale_value": 1.0,
        "qkv_bias": True,
    }
    (folder / "config.json").write_text(json.dumps(hub_config))

    encoder = load_encoder(str(folder), device="cpu")
    loaded = encoder.model.state_dict()
    assert loaded.keys() == original.state_dict().keys()
    assert all(torch.equal(loaded[key], value) for key, value in original.state_dict().items())
    images = torch.rand(2, 3, 56, 56)
    with torch.no_grad():
        tokens = original(pixel_values=normalize(images)).last_hidden_state
    assert torch.equal(encoder.encode(images), tokens[:, 1:].transpose(1, 2).reshape(2, -1, 4, 4))


def test_a_sam2_video_checkpoint_loads_with_its_video_modules_skipped(tmp_path):
    """The sam2_video layout of facebook/sam2.1-hiera-*: Sam2Model's ignore list drops the memory modules;
    every image-path weight is the video model's."""
    from tiny_models import randomise
    from transformers import Sam2VideoConfig, Sam2VideoModel

    image = tiny_sam2_config()
    config = Sam2VideoConfig(
        vision_config=image.vision_config.to_dict(),
        prompt_encoder_config=image.prompt_encoder_config.to_dict(),
        mask_decoder_config=image.mask_decoder_config.to_dict(),
        memory_attention_hidden_size=32,
        memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=64,
        memory_encoder_hidden_size=32,
        memory_encoder_output_channels=16,
        mask_downsampler_embed_dim=32,
        memory_fuser_embed_dim=32,
        memory_fuser_intermediate_dim=64,
    )
    video = Sam2VideoModel(config)
    randomise(video, seed=4)
    video.save_pretrained(tmp_path / "video")
    saved = load_file(tmp_path / "video" / "model.safetensors")
    assert any(key.startswith("memory_attention.") for key in saved)  # video modules are in the file

    loaded = load_segmenter(str(tmp_path / "video"), device="cpu").model.state_dict()
    assert loaded and all(torch.equal(value, saved[key]) for key, value in loaded.items())


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.bad_input
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_safetensors_file_is_refused(tiny_models, tmp_path, damage):
    folder = shutil.copytree(tiny_models[1], tmp_path / "damaged")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not safetensors" * 4)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated or not a safetensors file .*--dinov2"):
        load_encoder(str(folder), device="cpu")


@pytest.mark.bad_input
def test_a_dinov2_folder_given_as_sam2_is_refused(tiny_models):
    with pytest.raises(CheckpointError, match=r"holds a 'dinov2' model, not SAM2 .*point --sam2 / sam2= at a SAM2"):
        load_segmenter(str(tiny_models[1]), device="cpu")


@pytest.mark.bad_input
def test_a_folder_with_pickled_weights_only_is_refused(tiny_models, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_models[1] / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 pickled")
    with pytest.raises(CheckpointError, match=r"no model\.safetensors \(pickled weights .* are never loaded\)"):
        load_encoder(str(folder), device="cpu")


def meta_trunk(embed_dim: int, blocks: list[int]) -> dict[str, torch.Tensor]:
    """The Hiera trunk tensors of a Meta SAM2 state dict that tell its size (stage widths double)."""
    state = {"image_encoder.trunk.patch_embed.proj.weight": torch.zeros(embed_dim, 3, 7, 7)}
    start = 0
    for stage, count in enumerate(blocks):
        for block in range(start, start + count):
            state[f"image_encoder.trunk.blocks.{block}.norm2.weight"] = torch.zeros(embed_dim * 2**stage)
        if stage:
            state[f"image_encoder.trunk.blocks.{start}.proj.weight"] = torch.zeros(embed_dim * 2**stage, 1)
        start += count
    return state


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "name, state, held",
    [
        ("sam2_hiera_large.pt", meta_trunk(96, [1, 2, 7, 2]), "sam2 Hiera tiny"),
        (
            "sam2_hiera_tiny.pt",
            {**meta_trunk(96, [1, 2, 7, 2]), "no_obj_embed_spatial": torch.zeros(1)},
            "sam2.1 Hiera tiny",
        ),
        (
            "sam2.1_hiera_small.pt",
            meta_trunk(16, [1, 1, 2, 1]),
            r"sam2 Hiera of no official size \(blocks per stage \[1, 1, 2, 1\]\)",
        ),
    ],
)
def test_a_meta_file_holding_another_model_than_its_name_says_is_refused(tmp_path, name, state, held):
    path = tmp_path / name
    torch.save({"model": state}, path)
    version, size = re.match(r"(sam2(?:\.1)?)_hiera_(\w+)\.pt", name).groups()
    with pytest.raises(
        CheckpointError,
        match=rf"the file name says {re.escape(version)} Hiera {size}, but the weights are {held}.*--sam2",
    ):
        load_segmenter(str(path), device="cpu")


@pytest.mark.bad_input
def test_a_meta_dinov2_file_of_another_size_than_its_name_is_refused(tmp_path):
    path = tmp_path / "dinov2_vitl14_pretrain.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 384)}, path)
    with pytest.raises(
        CheckpointError, match=r"the file name says DINOv2 ViT-l/14, but the weights are ViT-s/14.*--dinov2"
    ):
        load_encoder(str(path), device="cpu")


@pytest.mark.bad_input
def test_a_name_that_is_no_model_says_what_it_could_be(tmp_path):
    with pytest.raises(
        ModelNotFoundError,
        match=r"SAM2 model '.*/nowhere/x' could not be loaded: no such file or folder.*sam2-large.*--sam2",
    ):
        load_segmenter(str(tmp_path / "nowhere" / "x"), device="cpu")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(
        CheckpointError, match=r"is a \.txt file, neither Meta's \.pt / \.pth checkpoint nor a transformers folder"
    ):
        load_encoder(str(tmp_path / "notes.txt"), device="cpu")


# ---------------------------------------------------------------------------------------------
# The hub: a stand-in on 127.0.0.1


@pytest.fixture
def hub_endpoint(monkeypatch, tmp_path):
    """``point(url)``: huggingface_hub online against ``url``, with an empty cache under ``tmp_path``
    (the test session is offline: conftest.py sets HF_HUB_OFFLINE, read once at import)."""
    from huggingface_hub import constants

    def point(url: str) -> Path:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
        return tmp_path / "hub"

    def forget_loaded_models():
        for cache in (models._model_on, models._segmenter, models._encoder):
            cache.cache_clear()

    forget_loaded_models()
    yield point
    forget_loaded_models()


def test_models_download_fills_the_standard_cache_and_the_defaults_load_from_it_offline(
    tiny_models, tmp_path, hub_endpoint, monkeypatch, capsys
):
    """The paper's pair through the real hub layout: Meta's sam2_hiera_large.pt in facebook/sam2-hiera-large
    and config.json + model.safetensors in facebook/dinov2-large. The tiny Meta trunk is declared an
    official size (Meta's sizes are what make a file's config readable from its shapes)."""
    pytest.importorskip("sam2")
    from tiny_models import build_tiny_meta_sam2

    from ntt_core import meta_checkpoints

    meta = build_tiny_meta_sam2("sam2", seed=5)
    pt = tmp_path / "sam2_hiera_large.pt"
    torch.save({"model": meta.state_dict()}, pt)
    monkeypatch.setitem(
        meta_checkpoints.HIERA_SIZES,
        (16, (1, 1, 2, 1)),
        {"name": "large", "heads": 1, "global": [3], "windows": [4, 2, 2, 2]},
    )
    repos = {
        "facebook/sam2-hiera-large": {"sam2_hiera_large.pt": pt.read_bytes()},
        "facebook/dinov2-large": {
            name: (tiny_models[1] / name).read_bytes() for name in ("config.json", "model.safetensors")
        },
    }
    with StandinHub(repos) as hub:
        cache = hub_endpoint(hub.url)
        monkeypatch.setenv("TQDM_POSITION", "-1")  # huggingface_hub's progress bars, also without a terminal
        assert main(["models", "download"]) == 0
        captured = capsys.readouterr()
        assert "sam2_hiera_large.pt: 100%" in captured.err and "model.safetensors: 100%" in captured.err
        out = captured.out.splitlines()
        assert re.match(
            r"sam2-large: [\d.]+ MB in .*sam2_hiera_large\.pt, loads strictly \([\d.]+ M parameters\)", out[0]
        )
        assert re.match(r"dinov2-large: [\d.]+ MB in .*, loads strictly", out[1])
        assert {path for _, path in hub.requests if "/resolve/" in path} == {
            "/facebook/sam2-hiera-large/resolve/main/sam2_hiera_large.pt",
            "/facebook/dinov2-large/resolve/main/config.json",
            "/facebook/dinov2-large/resolve/main/model.safetensors",
        }
        for repo, files in repos.items():  # huggingface_hub's own cache layout
            snapshot = cache / ("models--" + repo.replace("/", "--")) / "snapshots" / COMMIT
            assert all((snapshot / name).read_bytes() == content for name, content in files.items())

        assert main(["models", "list"]) == 0
        rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
        assert re.search(
            r"cached, [\d.]+ MB, .*models--facebook--sam2-hiera-large/snapshots/" + COMMIT, rows["sam2-large"]
        )
        assert "cached" in rows["dinov2-large"] and rows["sam2.1-large"].endswith("not cached")

        asked = len(hub.requests)
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
        models._model_on.cache_clear()
        segmenter, encoder = load_segmenter(device="cpu"), load_encoder(device="cpu")  # None: the paper's pair
        assert len(hub.requests) == asked  # from the cache alone
    assert (segmenter.model_id, encoder.model_id) == ("facebook/sam2-hiera-large", "facebook/dinov2-large")
    assert torch.equal(segmenter.model.mask_decoder.iou_token.weight, meta.sam_mask_decoder.iou_token.weight)
    assert encoder.fingerprint == load_encoder(str(tiny_models[1]), device="cpu").fingerprint


def test_a_config_cached_from_an_older_revision_still_finds_the_new_weights(tiny_models, hub_endpoint, monkeypatch):
    """config.json cached at one commit, the weights first fetched after the repo moved on: the weights
    land in the new commit's snapshot folder, and the model is loaded from that folder."""
    import standin_hub
    from huggingface_hub import hf_hub_download

    repo = "someone/dinov2-tiny"
    files = {name: (tiny_models[1] / name).read_bytes() for name in ("config.json", "model.safetensors")}
    with StandinHub({repo: {"config.json": files["config.json"]}}) as hub:
        cache = hub_endpoint(hub.url)
        hf_hub_download(repo, "config.json")  # cached at COMMIT
        hub.repos[repo] = files
        monkeypatch.setattr(standin_hub, "COMMIT", "f" * 40)  # the repo's next commit
        encoder = load_encoder(repo, device="cpu")
    assert (cache / "models--someone--dinov2-tiny" / "snapshots" / ("f" * 40) / "model.safetensors").is_file()
    assert encoder.fingerprint == load_encoder(str(tiny_models[1]), device="cpu").fingerprint


def test_models_files_lists_the_exact_urls(hub_endpoint, capsys):
    hub_endpoint("http://127.0.0.1:1")
    assert main(["models", "files", "sam2-large", "dinov2-large", "sam2.1-tiny"]) == 0
    urls = [line.strip() for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert urls == [
        "http://127.0.0.1:1/facebook/sam2-hiera-large/resolve/main/sam2_hiera_large.pt",
        "http://127.0.0.1:1/facebook/dinov2-large/resolve/main/config.json",
        "http://127.0.0.1:1/facebook/dinov2-large/resolve/main/model.safetensors",
        "http://127.0.0.1:1/facebook/sam2.1-hiera-tiny/resolve/main/sam2.1_hiera_tiny.pt",
    ]


@pytest.mark.bad_input
def test_hub_ids_and_files_that_do_not_exist_are_named(hub_endpoint, capsys):
    with StandinHub({"facebook/dinov2-large": {"config.json": b"{}"}}) as hub:
        hub_endpoint(hub.url)
        with pytest.raises(
            ModelNotFoundError,
            match=r"DINOv2 model 'facebook/no-such-model': no such repository on http://127\.0\.0\.1:\d+ .*--dinov2",
        ):
            load_encoder("facebook/no-such-model", device="cpu")
        with pytest.raises(
            ModelNotFoundError, match=r"'facebook/dinov2-large' has no model\.safetensors on the hub .*--dinov2"
        ):
            load_encoder("dinov2-large", device="cpu")
        assert main(["models", "download", "sam3-huge"]) == 2
        assert "ntt: error: unknown model name 'sam3-huge'; known: sam2-tiny" in capsys.readouterr().err


@pytest.mark.bad_input
def test_an_unreachable_hub_fails_at_once_without_retries(hub_endpoint, caplog):
    """No ``Retrying in 8s [Retry 5/5]``: one request, then one line naming the endpoint and the fix."""
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    hub_endpoint(f"http://127.0.0.1:{port}")
    caplog.set_level(logging.INFO, logger="huggingface_hub")
    with pytest.raises(ModelNotFoundError) as caught:
        load_encoder(device="cpu")
    message = str(caught.value)
    assert re.match(
        rf"DINOv2 weights facebook/dinov2-large/config\.json are not in the Hugging Face cache and "
        rf"http://127\.0\.0\.1:{port} cannot be reached \(.*\); download it with `ntt models download`",
        message,
    )
    assert message.endswith("or point --dinov2 / dinov2= at a local copy")
    assert not [record for record in caplog.records if "Retrying" in record.getMessage()]
    assert resolve_model(SAM2).hub_files() == ["sam2_hiera_large.pt"]
    assert resolve_model(DINOV2).hub_files() == ["config.json", "model.safetensors"]
