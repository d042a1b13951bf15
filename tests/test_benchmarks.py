"""Smoke tests of benchmarks/speed.py, fsod.py, decoder.py and video.py: each main() run in-process
with the tiniest options, its JSON contract checked; the random full-size architectures checked
against Meta's official definitions (built on the meta device, no memory, no download)."""

from __future__ import annotations

import functools
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SPEED_KEYS = {
    "images_per_s",
    "stages",
    "device",
    "dtype",
    "weights",
    "peak_host_mb",
    "peak_device_mb",
    "full_size_masks_mb",
}
STAGES = {
    "decode",
    "preprocess",
    "sam2_encoder",
    "dinov2_encoder",
    "prompt_decoding",
    "mask_postprocess",
    "matching",
    "nms",
    "merge",
    "writing",
    "other",
}


def _load(name: str):
    module_name = f"benchmark_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, REPO / "benchmarks" / f"{name}.py")
        module = sys.modules[module_name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def _last_json(capsys) -> dict:
    lines = capsys.readouterr().out.strip().splitlines()
    return json.loads(lines[-1])


# --- speed.py ---


@pytest.mark.parametrize(
    "name", ["sam2/sam2_hiera_t", "sam2.1/sam2.1_hiera_s", "sam2.1/sam2.1_hiera_b+", "sam2/sam2_hiera_l"]
)
def test_random_sam2_architectures_are_metas_official_sizes(name, monkeypatch):
    """Every image-path weight of Meta's model has a place of the same shape in ours and no more;
    heads, windows and global-attention blocks agree with Meta's trunk."""
    pytest.importorskip("sam2")
    from hydra import compose
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from transformers import Sam2Model

    from ntt_core.meta_checkpoints import convert_sam2_state_dict

    speed = _load("speed")
    arch = {"t": "tiny", "s": "small", "b+": "base-plus", "l": "large"}[name.rsplit("_", 1)[1]]
    config = compose(config_name=f"configs/{name}.yaml")
    OmegaConf.resolve(config)
    monkeypatch.setattr(torch, "linspace", functools.partial(torch.linspace, device="cpu"))  # Hiera calls .item()
    with torch.device("meta"):
        meta = instantiate(config.model, _recursive_=True)
        ours = Sam2Model(speed.sam2_config(f"{name.split('/')[0]}-{arch}"))
    expected = {key: tuple(value.shape) for key, value in convert_sam2_state_dict(meta.state_dict()).items()}
    assert {key: tuple(value.shape) for key, value in ours.state_dict().items()} == expected
    trunk, backbone = meta.image_encoder.trunk, ours.config.vision_config.backbone_config
    assert list(backbone.num_attention_heads_per_stage) == [
        trunk.blocks[end].attn.num_heads for end in trunk.stage_ends
    ]
    assert list(backbone.window_size_per_stage) == list(trunk.window_spec)
    assert list(backbone.global_attention_blocks) == list(trunk.global_att_blocks)


@pytest.mark.parametrize("size", ["small", "base", "large", "giant"])
def test_random_dinov2_architectures_are_metas_official_sizes(size):
    """Against timm's DINOv2 definitions (which match Meta's): same widths, heads, depth, 518-px input
    and the same number of weights (ours also holds the unused 1 x C mask token)."""
    timm = pytest.importorskip("timm")
    from transformers import Dinov2Model

    speed = _load("speed")
    with torch.device("meta"):
        vit = timm.create_model(f"vit_{size}_patch14_dinov2", pretrained=False, num_classes=0)
        ours = Dinov2Model(speed.dinov2_config(f"dinov2-{size}"))
    config = ours.config
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (
        vit.embed_dim,
        vit.blocks[0].attn.num_heads,
        len(vit.blocks),
    )
    assert config.image_size == vit.patch_embed.img_size[0] == 518
    count = sum(p.numel() for p in ours.parameters()) - config.hidden_size
    assert count == sum(p.numel() for p in vit.parameters())


def test_decoder_benchmark_times_every_decoder_on_the_same_inputs(monkeypatch, capsys):
    """benchmarks/decoder.py: its JSON contract, the forced pass rates, and this tree's kept masks agree
    with transformers' after best-of-three and the filter (tiny config; the baseline is this commit's)."""
    from tiny_models import tiny_sam2_config

    decoder = _load("decoder")
    monkeypatch.setattr(decoder, "sam2_config", lambda arch: tiny_sam2_config())
    argv = ["--device", "cpu", "--prompts", "5", "--images", "2", "--repeats", "1", "--baseline", "HEAD", "--json"]
    assert decoder.main([*argv, "--pass-rates", "100", "50", "0"]) == 0
    report = _last_json(capsys)
    assert (report["images"], report["prompts"], report["dtype"], report["weights"]) == (2, 5, "float32", "random")
    assert [row["pass_rate"] for row in report["rows"]] == [1.0, 0.5, 0.0]
    assert [row["passed"] for row in report["rows"]] == [10, 5, 0]
    for row in report["rows"]:
        assert set(row["decoders"]) == {"transformers", "baseline", "ours"}
        for figures in row["decoders"].values():
            assert figures["prompts_per_s"] == pytest.approx(10 / figures["median_s"])
            assert figures["gflops_per_prompt"] > 0
            assert figures["peak_mb"] is None or figures["peak_mb_per_prompt"] == pytest.approx(figures["peak_mb"] / 10)
        medians = {name: figures["median_s"] for name, figures in row["decoders"].items()}
        assert row["speedup"] == pytest.approx(medians["transformers"] / medians["ours"])
        assert row["speedup_vs_baseline"] == pytest.approx(medians["baseline"] / medians["ours"])
        assert row["max_abs_logit_difference"] <= 1e-5 * max(1.0, row["max_abs_logit"])
    assert report["rows"][0]["max_abs_logit"] > 0
    flops = [row["decoders"]["ours"]["gflops_per_prompt"] for row in report["rows"]]
    assert flops[0] > flops[1] > flops[2]  # masks are made only for the prompts that pass
    assert report["decoders"] == report["rows"][0]["decoders"]


def _check_speed_report(report: dict, images: int) -> None:
    assert SPEED_KEYS <= set(report)
    assert set(report["stages"]) == STAGES
    assert all(seconds >= 0 for seconds in report["stages"].values())
    assert report["stages"]["decode"] > 0 and report["stages"]["sam2_encoder"] > 0 and report["stages"]["writing"] > 0
    assert sum(report["stages"].values()) == pytest.approx(report["seconds_per_image"], rel=1e-6)
    assert set(report["cpu_stages"]) == STAGES and report["cpu_stages"]["sam2_encoder"] > 0
    assert sum(report["cpu_stages"].values()) == pytest.approx(report["cpu_seconds_per_image"], rel=1e-6)
    assert report["images_per_s"] * report["seconds_per_image"] == pytest.approx(1.0)
    assert report["images"] == images
    assert report["device"] == "cpu" and report["peak_device_mb"] is None
    assert report["peak_host_mb"] > 100


def test_speed_random_weights(monkeypatch, capsys):
    """The random-weight path (the full-size configs are checked above; tiny ones keep this fast);
    --survivors forces the number of candidates past the IoU filter."""
    from tiny_models import tiny_dinov2_config, tiny_sam2_config

    speed = _load("speed")
    monkeypatch.setattr(speed, "sam2_config", lambda arch: tiny_sam2_config())
    monkeypatch.setattr(speed, "dinov2_config", lambda arch: tiny_dinov2_config())
    # on CPU the decoder would take each prompt alone (a pass count each); the cost account counts a GPU's layout
    monkeypatch.setattr(speed.prompt_decoder, "PIECE_BYTES", 1)
    argv = ["--device", "cpu", "--arch", "sam2-tiny", "--dinov2-arch", "dinov2-small", "--images", "1", "--warmup", "0"]
    argv += [
        "--image-size",
        "64x48",
        "--points-per-side",
        "2",
        "--prompt-batch-size",
        "3",
        "--classes",
        "2",
        "--shots",
        "1",
        "--survivors",
        "5",
        "--json",
    ]
    assert speed.main(argv) == 0
    report = _last_json(capsys)
    _check_speed_report(report, images=1)
    assert report["weights"] == "random"
    assert {m["weights"] for m in report["models"].values()} == {"random"}
    assert report["models"]["sam2"]["source"] == "sam2-tiny"
    assert report["dtype"] == "float32" and report["prompts"] == 4
    assert report["image_size"] == {"height": 48, "width": 64}
    candidates = report["candidates"]
    assert candidates["proposed"] == 5
    assert candidates["output"] <= candidates["after_nms"] <= 5
    assert report["full_size_masks_mb"] == pytest.approx(candidates["after_nms"] * 48 * 64 / 2**20)
    cost = report["cost"]  # one more image, counted: 4 prompts decoded 3 + 1
    assert set(cost["flops_per_image"]) == set(cost["sync_calls_per_image"]) == STAGES - {"other"}
    for stage in ("sam2_encoder", "dinov2_encoder", "prompt_decoding"):
        assert cost["flops_per_image"][stage] > 0
    assert cost["gflops_per_image"] == pytest.approx(sum(cost["flops_per_image"].values()) / 1e9)
    assert cost["prompt_batches"] == 2
    assert cost["sync_calls_per_image"]["prompt_decoding"] == 2  # the pass counts, once per prompt batch
    assert cost["sync_calls_per_image"]["sam2_encoder"] == cost["sync_calls_per_image"]["dinov2_encoder"] == 0
    assert cost["largest_tensors"]["prompt_decoding"][0]["mib"] > 0
    assert cost["h100_compute_bound_s_per_image"] == pytest.approx(
        cost["gflops_per_image"] * 1e9 / (cost["h100_peak_tflops"] * 1e12)
    )


def test_the_flop_counter_counts_in_place_products_as_their_out_of_place_forms():
    """torch's counter leaves out ``baddbmm_`` and ``addmm_``, which the prompt decoder accumulates its
    products with: the cost account counts them (2 per multiply-add, as torch counts ``baddbmm``)."""
    from torch.utils.flop_counter import FlopCounterMode

    speed = _load("speed")
    x, a, b = torch.zeros(3, 8, 16), torch.randn(3, 8, 4), torch.randn(3, 4, 16)
    y, c, d = torch.zeros(8, 16), torch.randn(8, 4), torch.randn(4, 16)
    with speed.flop_counter() as counter:
        x.baddbmm_(a, b)
        y.addmm_(c, d)
    assert counter.get_total_flops() == 2 * 3 * 8 * 4 * 16 + 2 * 8 * 4 * 16
    with FlopCounterMode(display=False) as out_of_place:
        torch.baddbmm(x, a, b)
    assert out_of_place.get_total_flops() == 2 * 3 * 8 * 4 * 16
    with FlopCounterMode(display=False) as in_place:
        x.baddbmm_(a, b)
    assert in_place.get_total_flops() == 0  # what the mapping is for (drop it once torch counts these)


def test_sync_counter_counts_the_calls_that_wait_for_a_device():
    speed = _load("speed")
    x = torch.arange(6.0)
    counter = speed.SyncCounter()
    with counter:
        x[x > 2]  # boolean mask
        x[1:3] + x[torch.tensor([0, 1])]  # slices and integer indices: no wait
        x.sum().item()
        x.tolist()
        (x > 2).nonzero_static(size=3)  # a fixed output size: no wait
        bool(x.any())
    assert counter.kinds == {"boolean mask": 1, "item": 1, "tolist": 1, "__bool__": 1}
    assert counter.total == 4


def test_speed_draws_large_scenes_small_and_enlarges_them(tmp_path, monkeypatch):
    from PIL import Image

    speed = _load("speed")
    monkeypatch.setattr(speed, "DRAW_SIDE", 40)
    (small,) = speed.write_images(tmp_path, 1, (30, 40), seed=0)
    (tmp_path / "large").mkdir()
    (large,) = speed.write_images(tmp_path / "large", 1, (90, 200), seed=0)
    assert Image.open(small).size == (40, 30) and Image.open(large).size == (200, 90)
    drawn = speed.make_scene(np.random.default_rng([0, 0]), size=(18, 40)).image  # 5 times smaller
    enlarged = np.asarray(Image.fromarray(drawn).resize((200, 90), Image.BICUBIC), dtype=np.float64)
    assert np.abs(np.asarray(Image.open(large), dtype=np.float64) - enlarged).mean() < 2  # JPEG's loss only


def test_speed_survivor_rows_and_bank_scaling(tiny_models, capsys):
    """Loaded (tiny) weights: one row per forced survivor count, one per bank size of the scaling table."""
    speed = _load("speed")
    sam2_dir, dinov2_dir = tiny_models
    argv = [
        "--device",
        "cpu",
        "--sam2",
        str(sam2_dir),
        "--dinov2",
        str(dinov2_dir),
        "--images",
        "2",
        "--batch-size",
        "2",
    ]
    argv += ["--image-size", "40x32", "--points-per-side", "2", "--survivors", "3", "9", "--scaling", "--json"]
    assert speed.main(argv) == 0
    report = _last_json(capsys)
    _check_speed_report(report, images=2)
    assert report["weights"] == "pretrained" and report["batch_size"] == 2 and report["warmup_batches"] == 1
    assert [row["survivors"] for row in report["survivor_rows"]] == [3, 9]
    assert [row["candidates"]["proposed"] for row in report["survivor_rows"]] == [3, 9]
    assert [(row["classes"], row["shots"]) for row in report["scaling"]] == [tuple(pair) for pair in speed.SCALING]
    assert all(row["candidates"]["proposed"] == 3 for row in report["scaling"])
    last = report["scaling"][-1]["seconds_per_image"]
    assert report["bank_overhead"] == pytest.approx(last / report["scaling"][0]["seconds_per_image"] - 1.0)


def test_speed_rejects_random_and_real_weights_together(tiny_models, capsys):
    speed = _load("speed")
    assert speed.main(["--device", "cpu", "--arch", "sam2-tiny", "--sam2", str(tiny_models[0])]) == 2
    assert "give --arch (random weights) or --sam2 (real weights), not both" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        speed.main(["--image-size", "640-480"])
    assert "expected WIDTHxHEIGHT" in capsys.readouterr().err


# --- fsod.py ---


def _model_options(tiny_models) -> list[str]:
    sam2_dir, dinov2_dir = tiny_models
    return ["--sam2", str(sam2_dir), "--dinov2", str(dinov2_dir), "--device", "cpu", "--points-per-side", "3"]


def _coco_layout(tmp_path: Path) -> Path:
    """A COCO 2017 folder of generated scenes: 6 train images, 3 val images."""
    from ntt_core.synthetic import CLASSES, make_dataset, write_coco_folder

    root = tmp_path / "coco"
    for split, seed, count in (("train2017", 1, 6), ("val2017", 2, 3)):
        write_coco_folder(
            make_dataset(count, seed=seed, size=(192, 224), radius=(0.12, 0.2)), tmp_path / split, CLASSES
        )
        shutil.move(tmp_path / split / "images", root / split)
        (root / "annotations").mkdir(exist_ok=True)
        shutil.move(tmp_path / split / "annotations.json", root / "annotations" / f"instances_{split}.json")
    return root


def test_fsod_on_a_coco_layout_samples_each_seed(tiny_models, tmp_path, capsys):
    """The COCO-FSOD path: references sampled from train2017 per (shots, seed), val2017 limited."""
    fsod = _load("fsod")
    root = _coco_layout(tmp_path)
    argv = ["--coco-root", str(root), "--shots", "1", "2", "--seeds", "33", "5", "--classes", "disc,square"]
    argv += ["--limit", "2", "--out", str(tmp_path / "out"), "--json", *_model_options(tiny_models)]
    assert fsod.main(argv) == 0
    report = _last_json(capsys)
    assert report["protocol"] == "coco-fsod"
    assert [(run["shots"], run["seed"]) for run in report["runs"]] == [(1, 33), (1, 5), (2, 33), (2, 5)]
    for run in report["runs"]:
        assert run["classes"] == ["disc", "square"] and run["images"] == 2
        references = json.loads((Path(run["output"]) / "references.json").read_text())
        for category in (1, 2):
            chosen = [a for a in references["annotations"] if a["category_id"] == category]
            assert len(chosen) == run["shots"] == len({a["image_id"] for a in chosen})
        assert run["references"] == 2 * run["shots"]
        for iou_type in ("bbox", "segm"):
            assert set(run["pycocotools"][iou_type]) == {"nAP", "nAP50", "nAP75"}
            assert all(0.0 <= value <= 1.0 for value in run["pycocotools"][iou_type].values())
        assert run["fiftyone"] is None
    assert report["summary"]["1"]["seeds"] == [33, 5]
    assert set(report["summary"]["2"]) >= {"pycocotools_bbox_nAP", "pycocotools_segm_nAP75"}


def test_fsod_samples_the_authors_references_and_reports_a_short_class(tiny_models, tmp_path, capsys):
    """By default the seed is set once for the run (the authors' few_shot_sampling.py); a class with
    fewer valid instances than K in distinct images shows in the printed table and the JSON's notes."""
    from ntt_core.coco import load_coco, sample_references

    fsod = _load("fsod")
    assert fsod.build_parser().parse_args([]).seed_scope == "run"
    root = _coco_layout(tmp_path)
    train = load_coco(root / "annotations" / "instances_train2017.json")
    argv = ["--coco-root", str(root), "--shots", "6", "--seeds", "33", "--classes", "disc,square", "--limit", "1"]
    argv += ["--out", str(tmp_path / "out"), "--json", *_model_options(tiny_models)]
    assert fsod.main(argv) == 0
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    (run,) = report["runs"]
    expected = sample_references(train, 6, 33, ["disc", "square"], seed_scope="run")
    assert json.loads((Path(run["output"]) / "references.json").read_text()) == expected
    short = expected["info"]["ntt_sampling"]["warnings"]
    assert short and all("valid instance(s) in distinct images, 6 asked" in note for note in short)
    assert run["notes"][: len(short)] == short
    assert all(f"  note: {note}" in out for note in short)


def test_fsod_on_a_custom_folder_with_fiftyone(tiny_models, tmp_path, capsys):
    """Every reference as given; results written as COCO json; FiftyOne's figures beside pycocotools'."""
    pytest.importorskip("fiftyone")
    from ntt_core.synthetic import CLASSES, make_dataset, write_coco_folder

    fsod = _load("fsod")
    references = write_coco_folder(make_dataset(2, seed=3), tmp_path / "refs", CLASSES)
    targets = write_coco_folder(make_dataset(2, seed=4), tmp_path / "targets", CLASSES)
    argv = ["--references", str(references), "--reference-images", str(tmp_path / "refs" / "images")]
    argv += ["--targets", str(targets), "--images", str(tmp_path / "targets" / "images"), "--fiftyone"]
    argv += ["--out", str(tmp_path / "out"), "--json", *_model_options(tiny_models)]
    assert fsod.main(argv) == 0
    report = _last_json(capsys)
    assert report["protocol"] == "custom"
    (run,) = report["runs"]
    assert run["shots"] is None and run["images"] == 2
    results = json.loads((Path(run["output"]) / "results.json").read_text())
    assert len(results) == run["detections"]
    assert json.loads((Path(run["output"]) / "metrics.json").read_text())["detections"] == run["detections"]
    for source in ("pycocotools", "fiftyone"):
        for iou_type in ("bbox", "segm"):
            assert set(run[source][iou_type]) == {"nAP", "nAP50", "nAP75"}
            assert all(0.0 <= value <= 1.0 for value in run[source][iou_type].values())


def test_fsod_names_the_missing_coco_files(tmp_path, capsys):
    fsod = _load("fsod")
    assert fsod.main(["--coco-root", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "instances_train2017.json" in error and "val2017" in error
    assert fsod.main(["--references", str(tmp_path / "refs.json")]) == 2
    assert "give --coco-root, or all of --references, --targets and --images" in capsys.readouterr().err


# --- precision.py ---


def test_precision_compares_bf16_with_fp32_on_the_same_weights_and_inputs(monkeypatch, capsys):
    """Tiny configs in place of the paper's sizes; every stage's agreement is reported."""
    from tiny_models import tiny_dinov2_config, tiny_sam2_config

    precision = _load("precision")
    monkeypatch.setattr(precision, "sam2_config", lambda arch: tiny_sam2_config())
    monkeypatch.setattr(precision, "dinov2_config", lambda arch: tiny_dinov2_config())
    argv = ["--image-size", "64x48", "--points-per-side", "2", "--candidates", "8", "--classes", "2", "--shots", "1"]
    assert precision.main([*argv, "--json"]) == 0
    report = _last_json(capsys)
    assert report["prompts"] == 4 and report["shared_candidates"]["candidates"] == 8
    assert 0 < report["sam2"]["image_embedding"]["max_rel"] < 0.1  # bf16 rounding, nothing larger
    assert 0.9 < report["dinov2"]["patch_cosine_min"] < 1.0
    assert 0.0 <= report["shared_candidates"]["top1_class_agree"] <= 1.0
    assert set(report["end_to_end"]) == {
        "instances",
        "mask_iou_mean",
        "share_iou_at_least_0.9",
        "score_max_abs_matched",
    }


# --- cache.py ---


def test_cache_benchmark_rows_per_survivor_count(monkeypatch, capsys):
    """One row per forced survivor count: uncached and cached seconds, bytes per image, and the
    cached instances checked against an uncached run of the edited bank."""
    from tiny_models import tiny_dinov2_config, tiny_sam2_config

    cache = _load("cache")
    monkeypatch.setattr(cache.speed, "sam2_config", lambda arch: tiny_sam2_config())
    monkeypatch.setattr(cache.speed, "dinov2_config", lambda arch: tiny_dinov2_config())
    argv = ["--device", "cpu", "--images", "1", "--image-size", "64x48", "--points-per-side", "2", "--warmup", "0"]
    argv += ["--survivors", "3", "7", "--repeats", "2", "--classes", "2", "--shots", "2", "--json"]
    assert cache.main(argv) == 0
    report = _last_json(capsys)
    assert [row["survivors"] for row in report["rows"]] == [3, 7]
    for row in report["rows"]:
        assert row["identical"] is True and len(row["cached_runs_s_per_image"]) == 2
        assert row["speedup"] == pytest.approx(row["uncached_s_per_image"] / row["cached_s_per_image"])
        assert row["bytes_per_image"] > 0
    assert report["rows"][1]["bytes_per_image"] > report["rows"][0]["bytes_per_image"]  # more candidates kept


# --- video.py ---


def test_video_benchmark_times_key_and_propagated_frames(monkeypatch, capsys):
    """benchmarks/video.py with tiny image and video configs: its JSON contract, one track followed,
    the figures positive and consistent with each other."""
    from tiny_models import tiny_dinov2_config, tiny_meta_sam2_config
    from video_scenes import WIDTH, tiny_video_config

    video = _load("video")
    monkeypatch.setattr(video, "sam2_config", lambda arch: tiny_meta_sam2_config(WIDTH))
    monkeypatch.setattr(video, "dinov2_config", lambda arch: tiny_dinov2_config())
    monkeypatch.setattr(video, "video_config", lambda arch: tiny_video_config())
    argv = ["--device", "cpu", "--points", "2", "--tracks", "1", "--frames", "2", "--key-frames", "1"]
    video.main([*argv, "--stride", "5", "--size", "96x128", "--json"])
    report = _last_json(capsys)
    assert (report["tracks"], report["frame_size"], report["key_frame_stride"]) == (1, [96, 128], 5)
    assert report["weights"] == "random" and report["points_per_side"] == 2
    propagated, key = report["seconds_per_propagated_frame"], report["seconds_per_key_frame"]
    assert 0 < propagated < key
    assert report["key_to_propagated_cost_ratio"] == pytest.approx(key / propagated, rel=0.03)  # of rounded seconds
    assert report["frames_per_second"] == pytest.approx(5 / (key + 4 * propagated), rel=0.05)


def test_video_benchmark_counts_flops_of_key_and_propagated_frames(monkeypatch, capsys):
    """benchmarks/video.py's FLOP account: a further track costs the first one less the image encoder,
    a key frame adds the image pipeline, and the prompt decoding counted on a 4x4 grid and scaled by
    the prompts is the 8x8 grid's counted directly (decoding is per prompt)."""
    from tiny_models import tiny_dinov2_config, tiny_meta_sam2_config
    from video_scenes import WIDTH, tiny_video_config

    video = _load("video")
    monkeypatch.setattr(video, "sam2_config", lambda arch: tiny_meta_sam2_config(WIDTH))
    monkeypatch.setattr(video, "dinov2_config", lambda arch: tiny_dinov2_config())
    monkeypatch.setattr(video, "video_config", lambda arch: tiny_video_config())
    argv = ["--device", "cpu", "--points", "8", "--tracks", "2", "--frames", "1", "--key-frames", "1"]
    flops = []
    for points in ("8", "4"):
        video.main([*argv, "--size", "192x256", "--flop-points", points, "--json"])
        report = _last_json(capsys)
        assert report["tracks"] == 2
        flops.append(report["flops"])
    direct, scaled = flops
    assert scaled["prompt_decoding_counted_at_points"] == 4
    decoding = [f["image_pipeline_gflops_by_stage"]["prompt_decoding"] for f in flops]
    assert decoding[0] > 0 and decoding[1] == pytest.approx(decoding[0], rel=0.02)  # 1% over: the per-image part
    first, further = direct["propagation_first_track_gflops"], direct["propagation_further_track_gflops"]
    assert 0 < further < first and direct["propagation_image_encoder_gflops"] == pytest.approx(
        first - further, abs=0.02
    )
    assert direct["memory_frames_read"] == 2  # the first frame and the timed one
    propagated, key, ratio = (
        direct[k] for k in ("propagated_frame_gflops", "key_frame_gflops", "key_to_propagated_flop_ratio")
    )
    assert propagated["4"] == pytest.approx(first + 3 * further, abs=0.003)
    for n in ("1", "4"):
        assert key[n] == pytest.approx(direct["image_pipeline_gflops"] + propagated[n], abs=0.003)
        assert ratio[n] == pytest.approx(key[n] / propagated[n], rel=0.02)
    assert ratio["1"] > ratio["4"] > 1
