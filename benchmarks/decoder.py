"""Prompt decoding alone: transformers' ``Sam2MaskDecoder`` against ntt_core's shared-image decoder.

Both get the same inputs: image features of the shapes SAM2 gives (random values: the cost does not
depend on them), the prompt embeddings of a point grid from SAM2's prompt encoder, and the same
random weights. Reports the median time per call (calls interleaved), prompts/s, peak memory while
decoding (CUDA allocator, or process RSS on CPU) and the largest difference between the outputs.

    python benchmarks/decoder.py --device cpu --json                        # 64 prompts, 1 image
    python benchmarks/decoder.py --device cuda --prompts 256 --images 4 --json   # the predictor's GPU call
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import (
    _positive,
    _status_mb,
    add_device_options,
    add_run_options,
    benchmark_main,
    device_and_dtype,
    device_sync,
    environment,
    fill_defaults,
    reset_peak_host,
    sam2_config,
)

from ntt_core.models import SAM2_MODELS, autocast
from ntt_core.prompt_decoder import decode_multimask
from ntt_core.proposals import point_grid

#: What each device runs unless told otherwise.
DEFAULTS = {
    "cpu": {"prompts": 64, "images": 1, "repeats": 3},
    "accelerator": {"prompts": 256, "images": 4, "repeats": 10},
}


def decoder_inputs(model, images: int, prompts: int, device: torch.device, seed: int) -> dict:
    """Features of ``images`` images and the embeddings of a grid of ``prompts`` point prompts."""
    generator = torch.Generator(device=device).manual_seed(seed)
    channels = model.config.mask_decoder_config.hidden_size
    sizes = model.backbone_feature_sizes  # [[4h, 4w], [2h, 2w], [h, w]]
    fine, coarse, embedding = (
        torch.randn(images, width, *size, generator=generator, device=device)
        for width, size in zip((channels // 8, channels // 4, channels), sizes)
    )
    side = math.ceil(prompts**0.5)
    points = point_grid(side, int(model.prompt_encoder.input_image_size), device)[:prompts]
    points = points[None, :, None].expand(images, -1, -1, -1)
    labels = torch.ones(points.shape[:3], dtype=torch.int32, device=device)
    sparse, dense = model.prompt_encoder(input_points=points, input_labels=labels, input_boxes=None, input_masks=None)
    positional = model.get_image_wide_positional_embeddings()
    return {
        "image": embedding,
        "positional": positional,
        "high_resolution": (fine, coarse),
        "sparse": sparse,
        "dense": dense,
    }


def transformers_decoder(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    logits, iou, _, _ = model.mask_decoder(
        image_embeddings=inputs["image"],
        image_positional_embeddings=inputs["positional"].expand(inputs["image"].shape[0], -1, -1, -1),
        sparse_prompt_embeddings=inputs["sparse"],
        dense_prompt_embeddings=inputs["dense"],
        multimask_output=True,
        high_resolution_features=list(inputs["high_resolution"]),
    )
    return logits, iou


def shared_image_decoder(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return decode_multimask(model.mask_decoder, **inputs)


DECODERS = {"transformers": transformers_decoder, "ours": shared_image_decoder}


def peak_memory_mb(decoder, model, inputs: dict, device: torch.device, dtype: torch.dtype) -> float | None:
    """Memory a call takes above what was held before it: CUDA allocator peak, or process peak RSS."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    elif not reset_peak_host():
        return None
    else:
        before = _status_mb("VmRSS") * 2**20
    with autocast(device, dtype):
        decoder(model, inputs)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _status_mb("VmHWM") * 2**20
    return (peak - before) / 2**20


def run(args: argparse.Namespace) -> dict:
    device, dtype = device_and_dtype(args)
    fill_defaults(args, DEFAULTS, device)
    from transformers import Sam2Model

    torch.manual_seed(args.seed)
    with torch.device(device):
        model = Sam2Model(sam2_config(args.arch)).eval()
    sync = device_sync(device)
    seconds: dict[str, list[float]] = {name: [] for name in DECODERS}
    with torch.inference_mode():
        inputs = decoder_inputs(model, args.images, args.prompts, device, args.seed)
        with autocast(device, dtype):
            outputs = {name: decoder(model, inputs) for name, decoder in DECODERS.items()}  # also the warm-up
        memory = {name: peak_memory_mb(decoder, model, inputs, device, dtype) for name, decoder in DECODERS.items()}
        for _ in range(args.repeats):
            for name, decoder in DECODERS.items():
                sync()
                start = time.perf_counter()
                with autocast(device, dtype):
                    decoder(model, inputs)
                sync()
                seconds[name].append(time.perf_counter() - start)
    (logits, iou), (reference_logits, reference_iou) = outputs["ours"], outputs["transformers"]
    decoded = args.images * args.prompts
    report = {
        "device": str(device),
        **environment(device),
        "dtype": str(dtype).replace("torch.", ""),
        "weights": "random",
        "arch": args.arch,
        "images": args.images,
        "prompts": args.prompts,
        "repeats": args.repeats,
        "decoders": {
            name: {
                "median_s": statistics.median(times),
                "prompts_per_s": decoded / statistics.median(times),
                "peak_mb": memory[name],
                "peak_mb_per_prompt": None if memory[name] is None else memory[name] / decoded,
            }
            for name, times in seconds.items()
        },
        "max_abs_logit_difference": (logits.float() - reference_logits.float()).abs().max().item(),
        "max_abs_logit": reference_logits.float().abs().max().item(),
        "max_abs_iou_difference": (iou.float() - reference_iou.float()).abs().max().item(),
    }
    report["speedup"] = report["decoders"]["transformers"]["median_s"] / report["decoders"]["ours"]["median_s"]
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_device_options(parser)
    parser.add_argument(
        "--arch",
        default="sam2-large",
        choices=list(SAM2_MODELS),
        help="SAM2 size (the decoder is the same in every size)",
    )
    parser.add_argument("--prompts", type=_positive, help="point prompts per image and call (default: 256; 64 on CPU)")
    parser.add_argument("--images", type=_positive, help="images per call (default: 4; 1 on CPU)")
    parser.add_argument("--repeats", type=_positive, help="timed calls of each decoder (default: 10; 3 on CPU)")
    add_run_options(parser)
    return parser


def print_report(report: dict) -> None:
    print(
        f"device {report['device']} ({report['device_name']}), {report['dtype']}: "
        f"{report['images']} image(s) x {report['prompts']} prompts per call"
    )
    for name, figures in report["decoders"].items():
        memory = "n/a" if figures["peak_mb"] is None else f"{figures['peak_mb']:,.0f} MiB"
        print(f"  {name:<13}{figures['median_s']:>9.4f} s  {figures['prompts_per_s']:>10,.0f} prompts/s  peak {memory}")
    print(
        f"  speed-up {report['speedup']:.2f}x; largest logit difference {report['max_abs_logit_difference']:.2e} "
        f"(largest logit {report['max_abs_logit']:.2f})"
    )


def main(argv: list[str] | None = None) -> int:
    return benchmark_main("decoder.py", build_parser(), run, print_report, argv)


if __name__ == "__main__":
    sys.exit(main())
