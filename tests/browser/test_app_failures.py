"""A run from the App that fails part-way, for real: the App server runs out of memory on a huge
image after finishing two, shows why with the resume hint, keeps serving, and the run resumes.

The failure is a real allocation failure in the App server's process: once its models are loaded,
its address space is capped (``RLIMIT_AS``) with room for the small scenes but not for decoding a
13,000 x 13,000 image. Nothing in the product is patched.
"""

from __future__ import annotations

import re
import resource
from pathlib import Path

import fiftyone as fo
import pytest
from app_pages import BUILT, expect, segmented
from fiftyone_scenes import scenes_dataset
from PIL import Image, ImageDraw

pytestmark = pytest.mark.browser
SIZE = (96, 128)  # scene height, width
BIG_SIDE = 13_000  # 169 M pixels: under PIL's refusal limit (179 M); 0.5 GB as RGB, copied while it is read
# Room above the server's address space once its models are loaded. Segmenting the big image fails in
# reading it (PIL's and numpy's copies) below about 1.7 GiB of room and succeeds from about 1.9 GiB (measured:
# the SAM2 frame is resized from the uint8 image, so the predictor no longer makes a float copy of it);
# the small scenes need next to nothing.
HEADROOM = int(1.2 * 2**30)
SETTINGS = (("Prompt grid points per side", 4), ("Max instances per image", 3))  # the same in every run


def big_image(path: Path) -> Path:
    """A flat grey ``BIG_SIDE``-px square with two shapes, as an 8-bit grey PNG (under 1 MB)."""
    image = Image.new("L", (BIG_SIDE, BIG_SIDE), 90)
    draw = ImageDraw.Draw(image)
    draw.ellipse((2000, 2000, 6000, 6000), fill=200)
    draw.rectangle((8000, 7000, 12000, 11000), fill=30)
    image.save(path, compress_level=1)
    return path


def vm_size(pid: int) -> int:
    """The process's address space in bytes (``VmSize``)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmSize:\s+(\d+) kB", status, re.M)[1]) * 1024


def run_form(app, skip_existing: bool = False):
    """Run Segment by reference from its form, into its default field."""
    prompt = app.operator_form("Segment by reference")
    for label, value in SETTINGS:
        app.set_field(prompt, label, value)
    if skip_existing:
        prompt.get_by_text("Skip samples that already have predictions", exact=True).click()
        app.settle(prompt)
    return app.run(prompt)


def detection_ids(dataset, field: str) -> dict[str, list[str]]:
    """The ids of the detections in ``field``, by sample id, for the samples that have the field."""
    ids, detections = dataset.exists(field).values(["id", f"{field}.detections"])
    return {sample_id: [d.id for d in found] for sample_id, found in zip(ids, detections)}


@pytest.fixture
def dataset(tmp_path):
    """Two small scenes, then the big image. Requested before the page, so that it is deleted after the
    page closes (deleted under an open page, the App's next query fails in the console)."""
    dataset = scenes_dataset(tmp_path, count=2, size=SIZE)
    dataset.name = "browser-out-of-memory"
    dataset.add_sample(fo.Sample(filepath=str(big_image(tmp_path / "big.png"))))  # segmented last
    # the grid shows a small thumbnail of it: the browser never decodes the big image
    thumbnail = tmp_path / "big-thumbnail.png"
    Image.new("L", (130, 130), 90).save(thumbnail)
    dataset.set_values("thumbnail", [*dataset.values("filepath")[:-1], str(thumbnail)])
    dataset.app_config.media_fields = ["filepath", "thumbnail"]
    dataset.app_config.grid_media_field = "thumbnail"
    dataset.save()
    yield dataset
    dataset.delete()


def test_a_run_that_runs_out_of_memory_shows_the_resume_hint_then_resumes(dataset, own_app):
    app, server = own_app, own_app.server
    scenes = dataset.values("id")[:2]
    app.open(dataset)
    # the bank, built in the App: the server imports torch and loads the models
    shown = app.run(app.operator_form("Build memory bank from reference instances"))
    expect(shown).to_contain_text(BUILT)
    shown.get_by_role("button", name="Done").click()

    base = vm_size(server.process.pid)
    limit = base + HEADROOM
    memory = f"the server's address space: {base / 2**30:.2f} GiB, capped at {limit / 2**30:.2f} GiB"
    original = resource.prlimit(server.process.pid, resource.RLIMIT_AS)
    resource.prlimit(server.process.pid, resource.RLIMIT_AS, (limit, original[1]))
    try:
        shown = run_form(app)
    finally:
        resource.prlimit(server.process.pid, resource.RLIMIT_AS, original)
    expect(shown.get_by_text("Segment by reference failed", exact=True)).to_be_visible()
    expect(shown).to_contain_text("segmentation stopped after 2 of 3 samples")
    expect(shown, memory).to_contain_text(re.compile("can't allocate memory|MemoryError"))  # torch's | numpy's, PIL's
    expect(shown).to_contain_text("run again with skip_existing to finish the rest")
    app.screenshot("failed")
    dataset.reload()
    finished = detection_ids(dataset, "ntt_predictions")
    assert sorted(finished) == sorted(scenes) and all(finished.values()), (memory, finished, server.log_tail())
    assert server.process.poll() is None, server.log_tail()

    shown.get_by_role("button", name="Done").click()
    shown = run_form(app, skip_existing=True)  # on the same page and server, without the cap
    expect(shown).to_contain_text(segmented("ntt_predictions", 1))
    dataset.reload()
    resumed = detection_ids(dataset, "ntt_predictions")
    assert sorted(resumed) == sorted(dataset.values("id")), (memory, resumed)
    assert {sample_id: resumed[sample_id] for sample_id in scenes} == finished  # not done again
