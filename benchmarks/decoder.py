"""Prompt decoding alone: transformers' ``Sam2MaskDecoder``, a baseline version of ntt_core's decoder
(issue 17's starting point, commit 246641b, read from git) and this tree's, each followed by the method's best-of-three choice and
IoU filter (what ``proposals.propose`` keeps).

All get the same inputs: image features of the shapes SAM2 gives (random values: the cost does not
depend on them), the prompt embeddings of a point grid from SAM2's prompt encoder, and the same
random weights. Random weights let every prompt pass the filter; since this tree's decoder upscales
only the prompts that pass, each ``--pass-rates`` row sets the threshold so that that share of the
prompts passes (from transformers' IoUs). Reports per row the median time per call (all decoders'
calls interleaved), prompts/s, peak memory while decoding (CUDA allocator, or process RSS on CPU),
speed-ups, and the largest difference between this tree's kept masks and transformers'.

    python benchmarks/decoder.py --device cpu --json                        # 64 prompts, 1 image
    python benchmarks/decoder.py --device cuda --prompts 256 --images 4 --json   # the predictor's GPU call
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import (
    BenchmarkError,
    _positive,
    _status_mb,
    add_device_options,
    add_run_options,
    benchmark_main,
    device_and_dtype,
    device_sync,
    environment,
    fill_defaults,
    flop_counter,
    reset_peak_host,
    sam2_config,
)

from ntt_core.models import SAM2_MODELS, autocast
from ntt_core.prompt_decoder import decode_best
from ntt_core.proposals import best_of_three, point_grid

ROOT = Path(__file__).resolve().parents[1]
#: The decoder that issue 17's speed-ups are measured against: main of the day the issue was filed.
BASELINE = "246641b"

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


def transformers_decoder(model, inputs: dict, threshold: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    logits, iou, _, _ = model.mask_decoder(
        image_embeddings=inputs["image"],
        image_positional_embeddings=inputs["positional"].expand(inputs["image"].shape[0], -1, -1, -1),
        sparse_prompt_embeddings=inputs["sparse"],
        dense_prompt_embeddings=inputs["dense"],
        multimask_output=True,
        high_resolution_features=list(inputs["high_resolution"]),
    )
    return best_of_three(logits, iou, threshold)


def baseline_decoder(ref: str):
    """``decode_multimask`` of ``ntt_core/prompt_decoder.py`` at git revision ``ref`` followed by
    best-of-three, or None where git or the revision is not available."""
    try:
        source = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{ref}:ntt_core/prompt_decoder.py"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    with tempfile.TemporaryDirectory(prefix="ntt-baseline-") as folder:
        path = Path(folder) / "baseline_prompt_decoder.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("baseline_prompt_decoder", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)

    def decode(model, inputs: dict, threshold: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return best_of_three(*module.decode_multimask(model.mask_decoder, **inputs), threshold)

    return decode


def our_decoder(model, inputs: dict, threshold: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return decode_best(model.mask_decoder, **inputs, iou_threshold=threshold)


def threshold_for(best_iou: torch.Tensor, share: float) -> float:
    """A threshold that ``share`` of the prompts' best IoUs (``[n]``) exceed: midway between the last
    passing and the first failing one; 0 for all."""
    best = best_iou.float().sort(descending=True).values
    passing = round(share * best.numel())
    if passing >= best.numel():
        return 0.0
    return 1.0 if passing == 0 else float(best[passing - 1] + best[passing]) / 2


def peak_memory_mb(decode, model, inputs: dict, threshold: float, device: torch.device, dtype) -> float | None:
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
        decode(model, inputs, threshold)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _status_mb("VmHWM") * 2**20
    return (peak - before) / 2**20


def counted_flops(decode, model, inputs: dict, threshold: float, device: torch.device, dtype) -> int:
    """FLOPs of one call as ``torch.utils.flop_counter`` counts them (speed.py's cost account)."""
    counter = flop_counter()
    with counter, autocast(device, dtype):
        decode(model, inputs, threshold)
    return counter.get_total_flops()


def largest_difference(ours: list, reference: list) -> float | None:
    """Largest |logit| difference between two per-image lists of kept (logits, iou); None where
    different prompts were kept (a borderline IoU rounded across the threshold)."""
    if [len(iou) for _, iou in ours] != [len(iou) for _, iou in reference]:
        return None
    differences = [(a.float() - b.float()).abs().max().item() for (a, _), (b, _) in zip(ours, reference) if len(a)]
    return max(differences, default=0.0)


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure_row(decoders: dict, model, inputs: dict, share: float, args, device, dtype) -> dict:
    """One pass-rate row: every decoder timed, calls interleaved, on the same inputs and threshold."""
    sync = device_sync(device)
    with autocast(device, dtype):  # transformers' best IoUs of every prompt (threshold 0: all pass) set the threshold
        threshold = threshold_for(torch.cat([iou for _, iou in transformers_decoder(model, inputs, 0.0)]), share)
    with autocast(device, dtype):
        outputs = {name: decode(model, inputs, threshold) for name, decode in decoders.items()}  # also the warm-up
    memory = {
        name: peak_memory_mb(decode, model, inputs, threshold, device, dtype) for name, decode in decoders.items()
    }
    flops = {name: counted_flops(decode, model, inputs, threshold, device, dtype) for name, decode in decoders.items()}
    seconds: dict[str, list[float]] = {name: [] for name in decoders}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in decoders}
    faults: dict[str, list[int]] = {name: [] for name in decoders}
    for _ in range(args.repeats):
        for name, decode in decoders.items():
            sync()
            start, start_cpu, start_faults = time.perf_counter(), time.process_time(), _minor_faults()
            with autocast(device, dtype):
                decode(model, inputs, threshold)
            sync()
            seconds[name].append(time.perf_counter() - start)
            cpu_seconds[name].append(time.process_time() - start_cpu)
            faults[name].append(_minor_faults() - start_faults)
    decoded = args.images * args.prompts
    row = {
        "pass_rate": share,
        "threshold": threshold,
        "passed": sum(len(iou) for _, iou in outputs["transformers"]),
        "decoders": {
            name: {
                "median_s": statistics.median(times),
                "median_cpu_s": statistics.median(cpu_seconds[name]),  # this process's CPU time: less load-bound
                "median_minor_faults": statistics.median(faults[name]),  # pages the kernel had to zero (CPU)
                "prompts_per_s": decoded / statistics.median(times),
                "gflops_per_prompt": flops[name] / decoded / 1e9,
                "peak_mb": memory[name],
                "peak_mb_per_prompt": None if memory[name] is None else memory[name] / decoded,
            }
            for name, times in seconds.items()
        },
        "max_abs_logit_difference": largest_difference(outputs["ours"], outputs["transformers"]),
        "max_abs_logit": max((m.float().abs().max().item() for m, _ in outputs["transformers"] if len(m)), default=0.0),
    }
    medians = {name: figures["median_s"] for name, figures in row["decoders"].items()}
    cpu = {name: figures["median_cpu_s"] for name, figures in row["decoders"].items()}
    row["speedup"] = medians["transformers"] / medians["ours"]
    row["speedup_vs_baseline"] = medians["baseline"] / medians["ours"] if "baseline" in medians else None
    row["cpu_speedup_vs_baseline"] = cpu["baseline"] / cpu["ours"] if "baseline" in cpu else None
    return row


def run(args: argparse.Namespace) -> dict:
    device, dtype = device_and_dtype(args)
    fill_defaults(args, DEFAULTS, device)
    from transformers import Sam2Model

    decoders = {"transformers": transformers_decoder}
    if args.baseline != "none":
        baseline = baseline_decoder(args.baseline or BASELINE)
        if baseline is not None:
            decoders["baseline"] = baseline
        elif args.baseline:
            raise BenchmarkError(f"--baseline {args.baseline}: git cannot show ntt_core/prompt_decoder.py there")
        else:  # the default, on a copy without git history (e.g. a device machine): transformers only
            print(f"decoder.py: no git revision {BASELINE} here; timing without the baseline", file=sys.stderr)
            args.baseline = "none"
    decoders["ours"] = our_decoder
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = Sam2Model(sam2_config(args.arch)).eval()
    with torch.inference_mode():
        inputs = decoder_inputs(model, args.images, args.prompts, device, args.seed)
        rows = [measure_row(decoders, model, inputs, rate / 100, args, device, dtype) for rate in args.pass_rates]
    return {
        "device": str(device),
        **environment(device),
        "dtype": str(dtype).replace("torch.", ""),
        "weights": "random",
        "arch": args.arch,
        "images": args.images,
        "prompts": args.prompts,
        "repeats": args.repeats,
        "baseline": None if args.baseline == "none" else args.baseline or BASELINE,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "rows": rows,
        # the first row's figures, as before pass rates were rows
        **{key: rows[0][key] for key in ("decoders", "speedup", "max_abs_logit_difference", "max_abs_logit")},
    }


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
    parser.add_argument(
        "--pass-rates",
        type=float,
        nargs="+",
        default=[100.0, 50.0],
        metavar="PERCENT",
        help="rows: the share of prompts that pass the IoU filter, forced by the threshold",
    )
    parser.add_argument(
        "--baseline",
        help=f"git revision whose ntt_core decoder is timed too (default: {BASELINE}, issue 17's starting point, "
        "where git has it; 'none': skip it)",
    )
    add_run_options(parser)
    return parser


def print_report(report: dict) -> None:
    print(
        f"device {report['device']} ({report['device_name']}), {report['dtype']}: "
        f"{report['images']} image(s) x {report['prompts']} prompts per call; load average {report['load_average']}"
    )
    for row in report["rows"]:
        print(f"{100 * row['pass_rate']:.0f} % pass (threshold {row['threshold']:.4f}, {row['passed']} passed)")
        for name, figures in row["decoders"].items():
            memory = "n/a" if figures["peak_mb"] is None else f"{figures['peak_mb']:,.0f} MiB"
            print(
                f"  {name:<13}{figures['median_s']:>9.4f} s ({figures['median_cpu_s']:.3f} s CPU, "
                f"{figures['median_minor_faults'] / 1e3:,.0f} k page faults)"
                f"{figures['prompts_per_s']:>10,.0f} prompts/s  {figures['gflops_per_prompt']:.3f} GFLOP/prompt  peak {memory}"
            )
        against = (
            "" if row["speedup_vs_baseline"] is None else f", {row['speedup_vs_baseline']:.2f}x against the baseline"
        )
        difference = row["max_abs_logit_difference"]
        agreement = (
            "different prompts kept" if difference is None else f"largest kept-logit difference {difference:.2e}"
        )
        print(f"  speed-up {row['speedup']:.2f}x against transformers{against}; {agreement}")


def main(argv: list[str] | None = None) -> int:
    return benchmark_main("decoder.py", build_parser(), run, print_report, argv)


if __name__ == "__main__":
    sys.exit(main())
