"""The plugin's segmentation fills the candidate cache by default; *Clear candidate cache* empties it."""

import fiftyone.operators as foo

PLUGIN = "@ntt/no-time-to-train"
FAST = dict(points_per_side=2, sam_iou_threshold=0.0, max_detections=5)


def test_segmenting_fills_the_cache_and_clearing_empties_it(dataset, models, tmp_path, monkeypatch):
    monkeypatch.setenv("NTT_CACHE_DIR", str(tmp_path / "cache"))
    foo.get_operator(f"{PLUGIN}/build_memory_bank")(dataset, "gt", **models)
    foo.get_operator(f"{PLUGIN}/segment_by_reference")(dataset, "references", "pred", **FAST, **models)
    sizes = [path.stat().st_size for path in (tmp_path / "cache").iterdir()]
    assert len(sizes) == len(dataset)
    report = foo.get_operator(f"{PLUGIN}/clear_candidate_cache")(dataset)["report"]
    assert report == {"folder": str(tmp_path / "cache"), "freed_bytes": sum(sizes)}
    assert list((tmp_path / "cache").iterdir()) == []
