"""bf16 autocast (the ``--dtype bfloat16`` option) against fp32 (the default, as the authors ran) on
identical inputs: how far the option moves each stage.

The same models (random weights at the paper's sizes unless ``--sam2`` / ``--dinov2`` are given) run
once in fp32 and once under bf16 autocast, on one generated scene:

- SAM2: the image embedding, and the mask logits and predicted IoUs of a prompt grid;
- DINOv2: the patch features of the scene's 518-px input;
- matching on shared synthetic candidates (the same masks for both dtypes, so that candidates
  flipped by SAM2 cannot hide the encoder's share): semantic scores and top-1 classes;
- end to end: the predictor's instances, matched by mask IoU.

    python benchmarks/precision.py --device cpu --json      # a few minutes on CPU
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import (
    BenchmarkError,
    _image_size,
    _positive,
    add_run_options,
    benchmark_main,
    blob_logits,
    dinov2_config,
    environment,
    sam2_config,
    synthetic_bank,
)

from ntt_core.frames import bicubic, square_frame
from ntt_core.matching import pool_features, score_classes
from ntt_core.models import Dinov2Encoder, Sam2Segmenter, choose_device, load_encoder, load_segmenter
from ntt_core.predictor import Predictor
from ntt_core.proposals import point_grid
from ntt_core.settings import Settings
from ntt_core.synthetic import make_scene


def models(args: argparse.Namespace, device: torch.device) -> dict:
    """``{"float32": (segmenter, encoder), "bfloat16": (...)}`` sharing one set of weights."""
    from transformers import Dinov2Model, Sam2Model

    torch.manual_seed(args.seed)
    sam2 = load_segmenter(args.sam2, device).model if args.sam2 else Sam2Model(sam2_config("sam2-large"))
    dinov2 = load_encoder(args.dinov2, device).model if args.dinov2 else Dinov2Model(dinov2_config("dinov2-large"))
    return {
        name: (Sam2Segmenter(sam2, "sam2", device, dtype), Dinov2Encoder(dinov2, "dinov2", device, dtype))
        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))
    }


def difference(reference: torch.Tensor, other: torch.Tensor) -> dict:
    """Largest absolute difference, and the same relative to the reference's largest magnitude."""
    gap = float((reference.float() - other.float()).abs().max())
    return {"max_abs": gap, "max_rel": gap / max(float(reference.abs().max()), 1e-12)}


def matched_instances(reference, other) -> dict:
    """Each fp32 instance against the bf16 instance of its class with the highest mask IoU."""
    ious, gaps = [], []
    for i in range(len(reference)):
        mask = reference.full_mask(i)
        best, gap = 0.0, None
        for j in np.flatnonzero(other.labels == reference.labels[i]):
            candidate = other.full_mask(j)
            iou = float((mask & candidate).sum() / max((mask | candidate).sum(), 1))
            if iou > best:
                best, gap = iou, abs(float(reference.scores[i] - other.scores[j]))
        ious.append(best)
        if gap is not None:
            gaps.append(gap)
    return {
        "instances": [len(reference), len(other)],
        "mask_iou_mean": float(np.mean(ious)) if ious else None,
        "share_iou_at_least_0.9": float(np.mean(np.asarray(ious) >= 0.9)) if ious else None,
        "score_max_abs_matched": max(gaps) if gaps else None,
    }


def run(args: argparse.Namespace) -> dict:
    try:
        device = choose_device(args.device)
    except RuntimeError as error:
        raise BenchmarkError(f"--device {args.device}: {error}") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    pairs = models(args, device)
    segmenter, encoder = pairs["float32"]
    image = make_scene(np.random.default_rng(args.seed), size=args.image_size).image
    frame = square_frame(image, segmenter.input_size)
    points = point_grid(args.points_per_side, segmenter.input_size, device)[None]  # [1, P, 2]
    bank = synthetic_bank(encoder, args.classes, args.shots, args.seed)
    candidates = blob_logits(args.candidates, segmenter.mask_size, args.seed, device) > 0  # [N, m, m]
    settings = Settings(points_per_side=args.points_per_side)
    out = {}
    for name, (segmenter, encoder) in pairs.items():
        features = segmenter.embed(frame)
        logits, iou = segmenter.segment_points(features, points)  # [1, P, 3, m, m], [1, P, 3]
        dense = encoder.encode(bicubic(frame.to(device), (encoder.input_size,) * 2))  # [1, C, g, g]
        descriptors = F.normalize(pool_features(dense[0], candidates), dim=1)
        scores, labels = score_classes(descriptors, bank.prototypes().to(device))
        instances = Predictor(segmenter, encoder, bank, settings).predict([image])[0]
        out[name] = {"embedding": features.embeddings, "logits": logits, "iou": iou, "dense": dense}
        out[name].update(scores=scores, labels=labels, instances=instances)
    full, half = out["float32"], out["bfloat16"]
    cosine = F.cosine_similarity(full["dense"].flatten(2), half["dense"].flatten(2), dim=1)  # [1, g*g]
    best_of_3 = full["iou"][..., 1:].argmax(-1) == half["iou"][..., 1:].argmax(-1)
    return {
        "environment": environment(device),
        "weights": {"sam2": args.sam2 or "random sam2-large", "dinov2": args.dinov2 or "random dinov2-large"},
        "image_size": {"height": args.image_size[0], "width": args.image_size[1]},
        "prompts": int(points.shape[1]),
        "sam2": {
            "image_embedding": difference(full["embedding"], half["embedding"]),
            "mask_logits": difference(full["logits"], half["logits"]),
            "mask_pixels_flipped": float(((full["logits"] > 0) != (half["logits"] > 0)).float().mean()),
            "predicted_iou_max_abs": float((full["iou"] - half["iou"]).abs().max()),
            "best_of_3_agree": float(best_of_3.float().mean()),
        },
        "dinov2": {"features": difference(full["dense"], half["dense"]), "patch_cosine_min": float(cosine.min())},
        "shared_candidates": {
            "candidates": int(candidates.shape[0]),
            "semantic_score_max_abs": float((full["scores"] - half["scores"]).abs().max()),
            "top1_class_agree": float((full["labels"] == half["labels"]).float().mean()),
        },
        "end_to_end": matched_instances(full["instances"], half["instances"]),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    parser.add_argument("--sam2", help="SAM2 weights (default: random weights of SAM2 Hiera-L)")
    parser.add_argument("--dinov2", help="DINOv2 weights (default: random weights of DINOv2 ViT-L/14)")
    parser.add_argument("--image-size", type=_image_size, default=(480, 640), metavar="WxH")
    parser.add_argument("--points-per-side", type=_positive, default=8, help="prompt grid side (the paper's: 32)")
    parser.add_argument("--candidates", type=_positive, default=256, help="shared synthetic candidates")
    parser.add_argument("--classes", type=_positive, default=20, help="classes in the memory bank")
    parser.add_argument("--shots", type=_positive, default=10, help="references per class in the memory bank")
    add_run_options(parser)
    return parser


def print_report(report: dict) -> None:
    for stage in ("sam2", "dinov2", "shared_candidates", "end_to_end"):
        print(f"{stage}: {json.dumps(report[stage])}")


def main(argv: list[str] | None = None) -> int:
    return benchmark_main("precision.py", build_parser(), run, print_report, argv)


if __name__ == "__main__":
    sys.exit(main())
