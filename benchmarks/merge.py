"""Seconds of the soft merge's full-resolution statistics (``merging.full_resolution_stats``) and
factors (``merging.soft_merge_factors``) at forced survivor counts (speed.py's blob masks, 20
classes) for several tile sides, side by side in one process, with every side's results checked
identical to the first's.

    python benchmarks/merge.py --threads 1 --survivors 100 400 1024 --tiles 1024 256 128
    python benchmarks/merge.py --threads 1 --image-size 2000x2000 --survivors 100 --tiles 512 128
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import speed

from ntt_core import merging
from ntt_core.geometry import mask_boxes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--survivors", type=speed._positive, nargs="+", default=[100, 400, 1024])
    parser.add_argument("--tiles", type=speed._positive, nargs="+", default=[1024, 256, merging.TILE_SIDE])
    parser.add_argument("--image-size", type=speed._image_size, default=(480, 640), metavar="WxH")
    parser.add_argument("--classes", type=speed._positive, default=20)
    parser.add_argument("--threads", type=speed._positive, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"image {args.image_size[1]}x{args.image_size[0]}, {torch.get_num_threads()} thread(s), torch {torch.__version__}"
    )
    for count in args.survivors:
        logits = speed.blob_logits(count, 256, 0, torch.device("cpu"))
        labels = torch.randint(0, args.classes, (count,), generator=torch.Generator().manual_seed(1))
        descriptors = F.normalize(torch.randn(count, 1024, generator=torch.Generator().manual_seed(2)), dim=1)
        windows = merging.window_bounds(mask_boxes(logits > 0), 256, args.image_size)
        first = None
        for tile in args.tiles:
            merging.TILE_SIDE = tile
            started = time.perf_counter()
            areas, boxes, intersections = merging.full_resolution_stats(logits, labels, windows, args.image_size)
            middle = time.perf_counter()
            factors = merging.soft_merge_factors(areas, intersections, descriptors)
            ended = time.perf_counter()
            results = (areas, boxes, factors)
            first = first or results
            same = all(torch.equal(a, b) for a, b in zip(first, results))
            print(
                f"survivors {count:5d}  tile {tile:5d}  stats {middle - started:7.3f} s  "
                f"factors {ended - middle:6.3f} s  identical to tile {args.tiles[0]}: {same}",
                flush=True,
            )


if __name__ == "__main__":
    main()
