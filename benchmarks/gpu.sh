#!/usr/bin/env bash
# Issue 7's GPU measurements in one command, for a session lent a GPU (the device tool's `run`):
# decoder.py (transformers' decoder against ours, bf16) and speed.py with the paper's settings, the
# survivor rows and the memory-bank scaling rows, in fp32 (the default, as the authors ran) and in
# bf16 (the option: its speed gain); cache.py (cached against uncached images) and video.py (key
# frame against propagated frame) at the paper's sizes. Logs (JSON last) land in $OUT, or ./gpu-results.
# The GPU machine lacks pycocotools (speed.py's writing stage); wheels made here are carried as .whl
# and installed first when present (benchmarks/README.md says how to make them).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ntt-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/ntt-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
status=0
nvidia-smi >"$out/nvidia-smi.txt" 2>&1
python3 benchmarks/decoder.py --device cuda --dtype bfloat16 --json 2>&1 | tee "$out/decoder.log" || status=1
for dtype in float32 bfloat16; do
    python3 benchmarks/speed.py --device cuda --dtype $dtype --survivors 100 400 1024 --scaling --json 2>&1 |
        tee "$out/speed-$dtype.log" || status=1
done
python3 benchmarks/cache.py --device cuda --paper --json 2>&1 | tee "$out/cache.log" || status=1
python3 benchmarks/video.py --device cuda --arch sam2-large --dinov2-arch dinov2-large --points 32 --json 2>&1 |
    tee "$out/video.log" || status=1
exit $status
