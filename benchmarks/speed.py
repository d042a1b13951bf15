"""Speed and memory of the real predictor, stage by stage, with full-size architectures.

Without weights (the default) the models are built from ``transformers`` configs of the official
sizes with random weights: the encoders' and the prompt decoder's cost does not depend on weight
values. How many candidates survive filtering does, so ``--survivors N`` replaces the candidates
that leave the IoU filter by exactly N blob-shaped masks, which makes the post-processing figures
mean the same with any weights. ``--sam2`` / ``--dinov2`` load real weights instead.

Stages are timed through the predictor's own stage labels (``ntt_core.stages``: the measured code is
the predictor itself, unpatched); on CUDA the device is synchronised around each stage here, never in
the library. A cost account follows on one more image (``"cost"``, skip with ``--no-cost``):
FLOPs, calls that would sync a GPU with the host, and the largest tensors, per stage. Does not need
fiftyone.

    python benchmarks/speed.py --device cpu --json            # small sizes, finishes in minutes
    python benchmarks/speed.py --device cuda --json           # the paper's settings
    python benchmarks/speed.py --device cuda --survivors 100 400 1024 --scaling --json
    python benchmarks/speed.py --images 1 --warmup 0 --image-size 10000x10000 --survivors 100 --json  # large images
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.ops import aten
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, addmm_flop, baddbmm_flop, sdpa_flop_count

if __package__ in (None, ""):  # run as a script from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ntt_core import prompt_decoder
from ntt_core.coco import instances_to_coco_results
from ntt_core.errors import NttError
from ntt_core.frames import image_tensor
from ntt_core.images import ImageError
from ntt_core.memory_bank import MemoryBank
from ntt_core.meta_checkpoints import HIERA_SIZES
from ntt_core.meta_dinov2_checkpoints import DINOV2_HEADS
from ntt_core.models import (
    DINOV2_MODELS,
    SAM2_MODELS,
    Dinov2Encoder,
    Sam2Segmenter,
    choose_device,
    choose_dtype,
    load_encoder,
    load_segmenter,
)
from ntt_core.predictor import Predictor
from ntt_core.settings import Settings
from ntt_core.stages import observe, stage
from ntt_core.synthetic import make_scene

STAGES = (
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
)
#: DINOv2 ViTs by short name: (width, depth); heads come from ``DINOV2_HEADS``. Input 518 px, patch 14.
DINOV2_DEPTHS = {
    "dinov2-small": (384, 12),
    "dinov2-base": (768, 12),
    "dinov2-large": (1024, 24),
    "dinov2-giant": (1536, 40),
}
DINOV2_INPUT = 518
SCALING = ((1, 1), (1, 10), (1, 30), (20, 1), (80, 1), (80, 30))  # (classes, shots)
DRAW_SIDE = 2048  # generated scenes larger than this are drawn at this size and enlarged
#: What each device runs unless told otherwise: CPU gets small sizes so a run takes minutes.
DEFAULTS = {
    "cpu": {
        "arch": "sam2-tiny",
        "dinov2_arch": "dinov2-small",
        "points_per_side": 8,
        "images": 2,
        "batch_size": 1,
        "warmup": 1,
    },
    "accelerator": {
        "arch": "sam2-large",
        "dinov2_arch": "dinov2-large",
        "points_per_side": 32,
        "images": 32,
        "batch_size": 4,
        "warmup": 1,
    },
}


class BenchmarkError(NttError):
    """A benchmark that cannot run as asked; the message says why."""


# --- models ---


def sam2_config(arch: str):
    """A ``Sam2Config`` of the official SAM2 / SAM2.1 size ``arch`` (e.g. ``sam2-large``); both
    versions share the image path's architecture."""
    from transformers import Sam2Config, Sam2HieraDetConfig, Sam2VisionConfig

    size_name = arch.split("-", 1)[1].replace("-", "_")
    (embed_dim, blocks), size = next((key, value) for key, value in HIERA_SIZES.items() if value["name"] == size_name)
    dims = [embed_dim * 2**stage for stage in range(len(blocks))]
    backbone = Sam2HieraDetConfig(
        hidden_size=embed_dim,
        num_attention_heads=size["heads"],
        blocks_per_stage=list(blocks),
        embed_dim_per_stage=dims,
        num_attention_heads_per_stage=[size["heads"] * 2**stage for stage in range(len(blocks))],
        window_size_per_stage=list(size["windows"]),
        global_attention_blocks=list(size["global"]),
        # Meta's configs: 14x14 for Base+ (Hiera's default), 7x7 for the others; it is interpolated, cost is the same
        window_positional_embedding_background_size=[14, 14] if size_name == "base_plus" else [7, 7],
    )
    return Sam2Config(vision_config=Sam2VisionConfig(backbone_config=backbone, backbone_channel_list=dims[::-1]))


def dinov2_config(arch: str):
    """A ``Dinov2Config`` of the official DINOv2 size ``arch`` (e.g. ``dinov2-large``), 518-px input."""
    from transformers import Dinov2Config

    width, depth = DINOV2_DEPTHS[arch]
    return Dinov2Config(
        hidden_size=width,
        num_hidden_layers=depth,
        num_attention_heads=DINOV2_HEADS[width],
        image_size=DINOV2_INPUT,
        patch_size=14,
        use_swiglu_ffn=arch == "dinov2-giant",
    )


def build_models(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """(segmenter, encoder, description): loaded weights where ``--sam2`` / ``--dinov2`` are given,
    random full-size architectures otherwise."""
    from transformers import Dinov2Model, Sam2Model

    torch.manual_seed(args.seed)
    description = {}
    if args.sam2:
        segmenter = load_segmenter(args.sam2, device, dtype)
        description["sam2"] = {"source": segmenter.model_id, "weights": "pretrained"}
    else:
        with torch.device(device):  # random init on the device: fast on a GPU
            model = Sam2Model(sam2_config(args.arch))
        segmenter = Sam2Segmenter(model, f"random {args.arch}", device, dtype)
        description["sam2"] = {"source": args.arch, "weights": "random"}
    if args.dinov2:
        encoder = load_encoder(args.dinov2, device, dtype)
        description["dinov2"] = {"source": encoder.model_id, "weights": "pretrained"}
    else:
        with torch.device(device):
            model = Dinov2Model(dinov2_config(args.dinov2_arch))
        encoder = Dinov2Encoder(model, f"random {args.dinov2_arch}", device, dtype)
        description["dinov2"] = {"source": args.dinov2_arch, "weights": "random"}
    for name, model in (("sam2", segmenter.model), ("dinov2", encoder.model)):
        description[name]["parameters_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
    return segmenter, encoder, description


def synthetic_bank(encoder, classes: int, shots: int, seed: int = 0) -> MemoryBank:
    """A bank of ``classes`` x ``shots`` references whose descriptors are the encoder's own features
    pooled over random boxes of one synthetic image: the right size and distribution, one encoder pass."""
    rng = np.random.default_rng(seed)
    size = encoder.input_size
    scene = make_scene(rng, size=(size, size))
    dense = encoder.encode(image_tensor(scene.image).to(encoder.device))[0].float().cpu()  # [C, g, g]
    grid = dense.shape[-1]
    descriptors = []
    for _ in range(classes * shots):
        y0, x0 = rng.integers(0, grid - 1, size=2)
        y1, x1 = y0 + rng.integers(1, grid - y0 + 1), x0 + rng.integers(1, grid - x0 + 1)
        descriptors.append(dense[:, y0:y1, x0:x1].mean(dim=(1, 2)))
    count = classes * shots
    return MemoryBank(
        classes=[f"class {i}" for i in range(classes)],
        descriptors=torch.stack(descriptors),
        class_index=torch.arange(classes).repeat_interleave(shots),
        negative=torch.zeros(count, dtype=torch.bool),
        reference_ids=[str(i) for i in range(count)],
        image_ids=["synthetic"] * count,
        encoder_id=encoder.model_id,
        encoder_fingerprint=encoder.fingerprint,
        encoder_input_size=encoder.input_size,
    )


def blob_logits(count: int, size: int, seed: int, device: torch.device) -> torch.Tensor:
    """``[count, size, size]`` mask logits of irregular blobs (wobbly ellipses) of many sizes and
    places, like the candidates SAM2 proposes; logit > 0 inside."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(low: float, high: float) -> torch.Tensor:
        return (low + (high - low) * torch.rand(count, 1, 1, generator=generator)).to(device)

    axis = torch.arange(size, dtype=torch.float32, device=device) + 0.5
    cy, cx = uniform(0, size), uniform(0, size)
    ry = size * torch.exp(uniform(np.log(1 / 64), np.log(1 / 4)))  # radii from 1/64 to 1/4 of the frame
    rx = size * torch.exp(uniform(np.log(1 / 64), np.log(1 / 4)))
    angle, phase, lobes = uniform(0, np.pi), uniform(0, 2 * np.pi), torch.floor(uniform(2, 6))
    dy, dx = axis[None, :, None] - cy, axis[None, None, :] - cx
    u = (dx * torch.cos(angle) + dy * torch.sin(angle)) / rx
    v = (dy * torch.cos(angle) - dx * torch.sin(angle)) / ry
    radius = torch.sqrt(u**2 + v**2) * (1 + 0.2 * torch.sin(lobes * torch.atan2(v, u) + phase))
    return 8.0 * (1.0 - radius)


# --- instrumentation ---


class StageTimer:
    """Exclusive totals per stage of the predictor's :func:`~ntt_core.stages.stage` labels (a nested
    stage's share is not its caller's): wall time, and any other cumulative ``meters`` (name ->
    reading so far, e.g. FLOPs counted); ``sync`` runs on entering and leaving every stage so
    asynchronous device work lands in its stage. ``counts[name]`` lists the ``items`` of each entry."""

    def __init__(self, sync: Callable[[], None], meters: dict[str, Callable[[], float]] | None = None) -> None:
        self.sync = sync
        self.meters = {"seconds": time.perf_counter, **(meters or {})}
        self.totals: dict[str, dict[str, float]] = {name: defaultdict(float) for name in self.meters}
        self.counts: dict[str, list[int]] = defaultdict(list)
        self.stack: list[str] = []  # the stages running now, innermost last
        self._children: list[dict[str, float]] = []

    @property
    def seconds(self) -> dict[str, float]:
        return self.totals["seconds"]

    def _read(self) -> dict[str, float]:
        return {name: read() for name, read in self.meters.items()}

    @contextlib.contextmanager
    def stage(self, name: str, items: int | None = None):
        """The hook :func:`~ntt_core.stages.observe` takes: meters ``name`` around the enclosed step."""
        if items is not None:
            self.counts[name].append(items)
        self.sync()
        start = self._read()
        self._children.append(dict.fromkeys(self.meters, 0.0))
        self.stack.append(name)
        try:
            yield
        finally:
            self.sync()
            spent = {meter: value - start[meter] for meter, value in self._read().items()}
            children = self._children.pop()
            self.stack.pop()
            for meter, value in spent.items():
                self.totals[meter][name] += value - children[meter]
                if self._children:
                    self._children[-1][meter] += value

    def reset(self) -> None:
        for totals in self.totals.values():
            totals.clear()
        self.counts.clear()


class ForcedSurvivors:
    """A segmenter that decodes as ``segmenter`` does, but while ``survivors`` (``[N, m, m]``
    logits) is set, every image's candidates after the IoU filter are those N masks (returned with
    the image batch's first prompt batch, none with the others)."""

    def __init__(self, segmenter) -> None:
        self.segmenter = segmenter
        self.survivors: torch.Tensor | None = None
        self._first = False

    def __getattr__(self, name: str):
        return getattr(self.segmenter, name)

    def embed(self, frames: torch.Tensor):
        self._first = True
        return self.segmenter.embed(frames)

    def segment_best_points(self, features, points: torch.Tensor, iou_threshold: float):
        chosen = self.segmenter.segment_best_points(features, points, iou_threshold)
        if self.survivors is None:
            return chosen
        logits = self.survivors if self._first else self.survivors[:0]
        self._first = False
        iou = torch.linspace(0.99, 0.45, self.survivors.shape[0], device=logits.device)[: logits.shape[0]]
        return [(logits, iou) for _ in chosen]


@contextlib.contextmanager
def instrumented(predictor: Predictor, timer: StageTimer, survivors: torch.Tensor | None):
    """Meter the predictor's stages with ``timer``; with ``survivors`` (``[N, m, m]`` logits, the
    predictor's segmenter a :class:`ForcedSurvivors`) every image's candidates after the IoU filter
    are those N masks."""
    if survivors is not None:
        predictor.segmenter.survivors = survivors
    try:
        with observe(timer.stage):
            yield
    finally:
        if survivors is not None:
            predictor.segmenter.survivors = None


# --- measuring ---


def write_images(folder: Path, count: int, size: tuple[int, int], seed: int) -> list[Path]:
    """``count`` synthetic scenes of ``size`` (H, W) as JPEG files; scenes with a side over
    :data:`DRAW_SIDE` are drawn at that scale and enlarged (drawing them full size takes minutes)."""
    from PIL import Image

    height, width = size
    shrink = max(1.0, max(size) / DRAW_SIDE)
    drawn = (max(16, round(height / shrink)), max(16, round(width / shrink)))
    paths = []
    for index in range(count):
        image = Image.fromarray(make_scene(np.random.default_rng([seed, index]), size=drawn).image)
        path = folder / f"{index:05d}.jpg"
        (image if drawn == size else image.resize((width, height), Image.BICUBIC)).save(path, quality=90)
        paths.append(path)
    return paths


def device_sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return torch.cuda.synchronize
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


def measure(
    predictor: Predictor, paths: Sequence[Path], batch_size: int, warmup: int, timer: StageTimer, survivors
) -> dict:
    """Images/s end to end (decode to COCO RLE) and seconds per image per stage."""
    category_ids = {name: i + 1 for i, name in enumerate(predictor.bank.classes)}
    batches = [list(paths[i : i + batch_size]) for i in range(0, len(paths), batch_size)]
    outputs = 0
    with instrumented(predictor, timer, survivors):
        for batch in batches[:1] * warmup:
            predictor.predict_paths(batch)
        timer.reset()
        timer.sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        for number, batch in enumerate(batches):
            for index, result in enumerate(predictor.predict_paths(batch)):
                if isinstance(result, ImageError):
                    raise BenchmarkError(str(result))
                with stage("writing"):
                    outputs += len(instances_to_coco_results(result, number * batch_size + index + 1, category_ids))
        timer.sync()
        total, total_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    count = len(paths)
    stages = {name: timer.seconds.get(name, 0.0) / count for name in STAGES}
    stages["other"] = max(0.0, total / count - sum(stages.values()))
    cpu_stages = {name: timer.totals["cpu_seconds"].get(name, 0.0) / count for name in STAGES}
    cpu_stages["other"] = max(0.0, total_cpu / count - sum(cpu_stages.values()))
    proposed = timer.counts["mask_postprocess"]  # each image's candidates after the IoU filter
    return {
        "images_per_s": count / total,
        "seconds_per_image": total / count,
        "stages": stages,
        # this process's user + system time (all its threads): less moved by other jobs than wall time
        "cpu_seconds_per_image": total_cpu / count,
        "cpu_stages": cpu_stages,
        "candidates": {
            "proposed": float(np.mean(proposed)) if proposed else 0.0,
            "after_nms": float(np.sum(timer.counts["merge"]) / count),
            "output": outputs / count,
        },
    }


# --- cost account ---

#: Tensor methods and functions that make the host wait for the device when their tensor is on one
#: (counted on CPU as calls: each would be one sync on a GPU). Indexing with a boolean mask is counted too.
SYNC_CALLS = frozenset(
    {"item", "cpu", "tolist", "nonzero", "argwhere", "masked_select", "unique", "__bool__", "__int__", "__float__"}
)
#: H100 SXM dense bfloat16 tensor-core peak (NVIDIA's datasheet; 1,979 TFLOP/s is with 2:4 sparsity).
H100_PEAK_TFLOPS = 989.4


class SyncCounter(TorchFunctionMode):
    """Counts the calls in :data:`SYNC_CALLS` and boolean-mask indexing, in all and by kind."""

    def __init__(self) -> None:
        super().__init__()
        self.kinds: Counter = Counter()
        self.total = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in ("__getitem__", "__setitem__") and _boolean_index(args[1]):
            name = "boolean mask"
        if name == "boolean mask" or name in SYNC_CALLS:
            self.kinds[name] += 1
            self.total += 1
        return func(*args, **(kwargs or {}))


def _boolean_index(index) -> bool:
    return any(
        isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (index if isinstance(index, tuple) else (index,))
    )


class LargestTensors(TorchDispatchMode):
    """The largest tensors each stage's operations allocate (outputs that alias no input)."""

    def __init__(self, timer: StageTimer) -> None:
        super().__init__()
        self.timer = timer
        self.sizes: dict[str, dict[tuple[str, tuple[int, ...]], int]] = defaultdict(dict)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(result.alias_info for result in func._schema.returns):
            stage = self.timer.stack[-1] if self.timer.stack else "other"
            for tensor in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(tensor, torch.Tensor):
                    key = (func.overloadpacket.__name__, tuple(tensor.shape))
                    self.sizes[stage][key] = tensor.numel() * tensor.element_size()
        return out

    def largest(self, count: int = 3) -> dict[str, list[dict]]:
        return {
            stage: [
                {"op": op, "shape": list(shape), "mib": size / 2**20}
                for (op, shape), size in sorted(sizes.items(), key=lambda item: -item[1])[:count]
            ]
            for stage, sizes in self.sizes.items()
        }


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter, also counting the attention kernel torch uses on CPU and the in-place
    matrix products ``baddbmm_`` (the prompt decoder's accumulations) and ``addmm_``, which it leaves out."""
    return FlopCounterMode(
        display=False,
        custom_mapping={
            aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
            # torch's own formulas for baddbmm / addmm, unwrapped (the mapping wraps them again)
            aten.baddbmm_: baddbmm_flop.__wrapped__,
            aten.addmm_: addmm_flop.__wrapped__,
        },
    )


@contextlib.contextmanager
def decoding_as_on_a_gpu():
    """The prompt decoder with each prompt batch in one piece, as it runs off CPU (for one image per
    call, as the cost account decodes): on CPU it decodes a batch a few prompts at a time
    (``prompt_decoder.PIECE_BYTES``, one pass count per piece), the same FLOPs and outputs up to float
    rounding, which would misstate a GPU's host syncs and tensor sizes."""
    pieces = prompt_decoder.PIECE_BYTES
    prompt_decoder.PIECE_BYTES = 2**62
    try:
        yield
    finally:
        prompt_decoder.PIECE_BYTES = pieces


def cost_account(predictor: Predictor, path: Path, survivors: torch.Tensor | None) -> dict:
    """One image through the instrumented predictor (untimed): FLOPs per stage (``FlopCounterMode``:
    matrix products, convolutions and attention; elementwise work is not counted), host-device sync
    calls per stage, and the largest tensors each stage allocates (prompt decoding: per prompt batch),
    with the prompt decoder laid out as on a GPU (:func:`decoding_as_on_a_gpu`)."""
    flops = flop_counter()
    syncs = SyncCounter()
    timer = StageTimer(lambda: None, {"flops": flops.get_total_flops, "sync_calls": lambda: syncs.total})
    sizes = LargestTensors(timer)
    category_ids = {name: i + 1 for i, name in enumerate(predictor.bank.classes)}
    with instrumented(predictor, timer, survivors), decoding_as_on_a_gpu(), flops, sizes, syncs:
        for result in predictor.predict_paths([path]):
            with stage("writing"):
                instances_to_coco_results(result, 1, category_ids)
    device_type = predictor.segmenter.device.type
    per_stage = {
        name: {stage: timer.totals[name].get(stage, 0.0) for stage in STAGES} for name in ("flops", "sync_calls")
    }
    total = sum(per_stage["flops"].values())
    return {
        "flops_per_image": {stage: int(value) for stage, value in per_stage["flops"].items()},
        "gflops_per_image": total / 1e9,
        "sync_calls_per_image": {stage: int(value) for stage, value in per_stage["sync_calls"].items()},
        "sync_calls_by_kind": dict(syncs.kinds),
        "prompt_batches": math.ceil(predictor.points.shape[0] / predictor.settings.prompt_batch(device_type)),
        "largest_tensors": sizes.largest(),
        "h100_peak_tflops": H100_PEAK_TFLOPS,
        "h100_compute_bound_s_per_image": total / (H100_PEAK_TFLOPS * 1e12),
    }


def reset_peak_host() -> bool:
    """Restart the kernel's peak-RSS counter of this process (Linux); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_host_mb(since_reset: bool) -> float | None:
    """Peak resident memory of this process in MiB: since the last :func:`reset_peak_host`, or overall."""
    if since_reset:
        return _status_mb("VmHWM")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _status_mb(key: str) -> float | None:
    """A memory figure of this process from ``/proc/self/status`` in MiB (None where there is none)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return None


def environment(device: torch.device) -> dict:
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


# --- command line ---


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_device_options(parser)
    parser.add_argument(
        "--sam2", help="SAM2 weights: short name, hub id, local directory or Meta .pt file (default: random weights)"
    )
    parser.add_argument(
        "--dinov2",
        help="DINOv2 weights: short name, hub id, local directory or Meta .pth file (default: random weights)",
    )
    parser.add_argument(
        "--arch", choices=list(SAM2_MODELS), help="random SAM2 architecture (default: sam2-large; sam2-tiny on CPU)"
    )
    parser.add_argument(
        "--dinov2-arch",
        choices=list(DINOV2_MODELS),
        help="random DINOv2 architecture (default: dinov2-large; dinov2-small on CPU)",
    )
    parser.add_argument("--images", type=_positive, help="timed images (default: 32; 2 on CPU)")
    parser.add_argument(
        "--image-size", type=_image_size, default=(480, 640), metavar="WxH", help="size of the generated JPEGs"
    )
    parser.add_argument("--batch-size", type=_positive, help="images per predictor call (default: 4; 1 on CPU)")
    parser.add_argument("--warmup", type=int, help="untimed batches first (default: 1)")
    parser.add_argument(
        "--points-per-side", type=_positive, help="prompt grid side (default: 32, the paper's; 8 on CPU)"
    )
    parser.add_argument("--prompt-batch-size", type=_positive, help="prompts decoded at once (default: 256; 64 on CPU)")
    parser.add_argument("--classes", type=_positive, default=20, help="classes in the memory bank")
    parser.add_argument("--shots", type=_positive, default=10, help="references per class in the memory bank")
    parser.add_argument(
        "--survivors",
        type=_positive,
        nargs="+",
        metavar="N",
        help="force exactly N candidates past the IoU filter (several: one row each)",
    )
    parser.add_argument(
        "--scaling", action="store_true", help=f"also rows of images/s for (classes, shots) in {list(SCALING)}"
    )
    parser.add_argument(
        "--no-cost",
        action="store_true",
        help="skip the cost account (one more image, untimed: FLOPs, sync calls, largest tensors per stage)",
    )
    add_run_options(parser)
    return parser


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """``--threads``, ``--seed`` and ``--json``, shared by the benchmarks."""
    parser.add_argument("--threads", type=_positive, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def add_device_options(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype``, read by :func:`device_and_dtype`."""
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: fp32 everywhere"
    )


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


def _image_size(text: str) -> tuple[int, int]:
    """'WxH' -> (H, W)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected WIDTHxHEIGHT, e.g. 640x480") from None
    if min(width, height) < 16:
        raise argparse.ArgumentTypeError(f"{text!r}: the generated images need at least 16 pixels per side")
    return height, width


def resolve_defaults(args: argparse.Namespace, device: torch.device) -> None:
    """Fill the options left unset with the device's defaults (small sizes on CPU)."""
    if args.arch and args.sam2:
        raise BenchmarkError("give --arch (random weights) or --sam2 (real weights), not both")
    if args.dinov2_arch and args.dinov2:
        raise BenchmarkError("give --dinov2-arch (random weights) or --dinov2 (real weights), not both")
    fill_defaults(args, DEFAULTS, device)


def fill_defaults(args: argparse.Namespace, defaults: dict[str, dict], device: torch.device) -> None:
    """Options left unset (None) take ``defaults["cpu"]`` or ``defaults["accelerator"]``."""
    for name, value in defaults["cpu" if device.type == "cpu" else "accelerator"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """The ``--threads``, ``--device`` and ``--dtype`` options applied; an unusable device is a BenchmarkError."""
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = choose_device(args.device)
    except RuntimeError as error:  # an unknown or unavailable device
        raise BenchmarkError(f"--device {args.device}: {error}") from None
    return device, choose_dtype(device, args.dtype)


def run(args: argparse.Namespace) -> dict:
    device, dtype = device_and_dtype(args)
    resolve_defaults(args, device)
    segmenter, encoder, models = build_models(args, device, dtype)
    segmenter = ForcedSurvivors(segmenter)
    settings = Settings(points_per_side=args.points_per_side, prompt_batch_size=args.prompt_batch_size)
    sync = device_sync(device)
    timer = StageTimer(sync, {"cpu_seconds": time.process_time})
    weights = {model["weights"] for model in models.values()}
    report = {
        "device": str(device),
        **environment(device),
        "dtype": str(dtype).replace("torch.", ""),
        "weights": weights.pop() if len(weights) == 1 else "mixed",
        "models": models,
        "image_size": {"height": args.image_size[0], "width": args.image_size[1]},
        "images": args.images,
        "batch_size": args.batch_size,
        "warmup_batches": args.warmup,
        "prompts": args.points_per_side**2,
        "prompt_batch_size": settings.prompt_batch(device.type),
        "classes": args.classes,
        "shots": args.shots,
        "survivors": args.survivors[0] if args.survivors else None,
    }
    survivor_sets = {n: blob_logits(n, segmenter.mask_size, args.seed, device) for n in args.survivors or []}
    first = survivor_sets[args.survivors[0]] if args.survivors else None
    with tempfile.TemporaryDirectory(prefix="ntt-speed-") as folder:
        paths = write_images(Path(folder), args.images, args.image_size, args.seed)
        predictor = Predictor(
            segmenter, encoder, synthetic_bank(encoder, args.classes, args.shots, args.seed), settings
        )
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        resettable = reset_peak_host()
        report["host_before_run_mb"] = _status_mb("VmRSS")
        report.update(measure(predictor, paths, args.batch_size, args.warmup, timer, first))
        # while predicting: read before the cost account, which decodes whole prompt batches even on CPU
        report["peak_host_run_mb"] = peak_host_mb(since_reset=True) if resettable else None
        report["peak_device_mb"] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        if not args.no_cost:
            report["cost"] = cost_account(predictor, paths[0], first)
        height, width = args.image_size  # what the candidates of one image would take as full-size bool masks:
        report["full_size_masks_mb"] = report["candidates"]["after_nms"] * height * width / 2**20
        if len(survivor_sets) > 1:
            report["survivor_rows"] = [{"survivors": args.survivors[0], **_row(report)}] + [
                {"survivors": n, **_row(measure(predictor, paths, args.batch_size, 0, timer, logits))}
                for n, logits in list(survivor_sets.items())[1:]
            ]
        if args.scaling:
            report["scaling"] = []
            for classes, shots in SCALING:
                bank = synthetic_bank(encoder, classes, shots, args.seed)
                row = measure(Predictor(segmenter, encoder, bank, settings), paths, args.batch_size, 0, timer, first)
                report["scaling"].append({"classes": classes, "shots": shots, **_row(row)})
            base, most = report["scaling"][0]["seconds_per_image"], report["scaling"][-1]["seconds_per_image"]
            report["bank_overhead"] = most / base - 1.0  # 80 classes x 30 shots against 1 x 1
    report["peak_host_mb"] = peak_host_mb(since_reset=False)
    return report


def _row(measured: dict) -> dict:
    return {key: measured[key] for key in ("images_per_s", "seconds_per_image", "stages", "candidates")}


def print_report(report: dict) -> None:
    models = ", ".join(
        f"{name} {m['source']} ({m['weights']}, {m['parameters_m']} M)" for name, m in report["models"].items()
    )
    print(f"device {report['device']} ({report['device_name']}), {report['dtype']}; {models}")
    print(
        f"{report['images']} images {report['image_size']['width']}x{report['image_size']['height']}, batch {report['batch_size']}, "
        f"{report['prompts']} prompts, {report['classes']} classes x {report['shots']} shots, survivors {report['survivors'] or 'natural'}"
    )
    print(f"{'stage':<18}{'s/image':>10}{'share':>8}{'CPU s/image':>13}")
    total = report["seconds_per_image"]
    for name, seconds in report["stages"].items():
        print(f"{name:<18}{seconds:>10.4f}{100 * seconds / total:>7.1f}%{report['cpu_stages'][name]:>13.4f}")
    candidates = report["candidates"]
    print(
        f"{report['images_per_s']:.3f} images/s ({total:.3f} s/image, {report['cpu_seconds_per_image']:.3f} CPU s/image); candidates per image: {candidates['proposed']:.0f} proposed, "
        f"{candidates['after_nms']:.0f} after NMS, {candidates['output']:.0f} written"
    )
    device_peak = f"{report['peak_device_mb']:.0f} MiB" if report["peak_device_mb"] is not None else "-"
    run_peak = f"{report['peak_host_run_mb']:.0f} MiB" if report["peak_host_run_mb"] is not None else "-"
    if report["peak_host_run_mb"] is not None and report["host_before_run_mb"] is not None:
        run_peak += f", {report['peak_host_run_mb'] - report['host_before_run_mb']:+.0f} MiB over the models and bank"
    print(
        f"peak host memory {report['peak_host_mb']:.0f} MiB (while predicting {run_peak}), peak device memory {device_peak}"
    )
    print(
        f"the candidates after NMS as full-size bool masks would take {report['full_size_masks_mb']:.0f} MiB per image"
    )
    for key, label in (("survivor_rows", "survivors"), ("scaling", "classes x shots")):
        for row in report.get(key, []):
            what = str(row["survivors"]) if key == "survivor_rows" else f"{row['classes']} x {row['shots']}"
            print(f"{label} {what}: {row['images_per_s']:.3f} images/s, {row['candidates']['after_nms']:.0f} after NMS")
    if "cost" in report:
        cost = report["cost"]
        gflops = {stage: flops / 1e9 for stage, flops in cost["flops_per_image"].items() if flops}
        print(
            f"cost account: {cost['gflops_per_image']:,.0f} GFLOP per image ({', '.join(f'{k} {v:,.1f}' for k, v in gflops.items())})"
        )
        print(
            f"  at the H100's {cost['h100_peak_tflops']} TFLOP/s (bf16, dense): {1e3 * cost['h100_compute_bound_s_per_image']:.2f} ms/image; "
            f"sync calls per image {sum(cost['sync_calls_per_image'].values())} "
            f"(prompt decoding {cost['sync_calls_per_image']['prompt_decoding']} over {cost['prompt_batches']} prompt batches)"
        )
        for tensor in cost["largest_tensors"].get("prompt_decoding", []):
            print(f"  prompt decoding tensor {tensor['op']} {tensor['shape']}: {tensor['mib']:,.0f} MiB")
    if "bank_overhead" in report:
        print(f"memory bank 80 x 30 against 1 x 1: {100 * report['bank_overhead']:+.1f}% time per image")


def benchmark_main(name: str, parser, run, print_report, argv: list[str] | None) -> int:
    """Parse ``argv``, run, print the report, and its JSON as the last line with ``--json``; one
    line and exit code 2 on an :class:`~ntt_core.errors.NttError`."""
    args = parser.parse_args(argv)
    try:
        report = run(args)
    except NttError as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        return 2
    print_report(report)
    if args.json:
        print(json.dumps(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    return benchmark_main("speed.py", build_parser(), run, print_report, argv)


if __name__ == "__main__":
    sys.exit(main())
