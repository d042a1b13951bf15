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


def test_the_panel_shows_the_cache_size_and_clear_cache_opens_the_operator(dataset, models, tmp_path, monkeypatch):
    from test_panel import PANEL, panel_event, prompts, rendered

    folder = tmp_path / "cache"
    monkeypatch.setenv("NTT_CACHE_DIR", str(folder))
    assert "**Candidate cache:** 0 KB" in rendered(panel_event("on_load", dataset))["candidate_cache.size"]["default"]
    assert not folder.exists()  # showing the size creates nothing
    foo.get_operator(f"{PLUGIN}/build_memory_bank")(dataset, "gt", **models)
    foo.get_operator(f"{PLUGIN}/segment_by_reference")(dataset, "references", "pred", **FAST, **models)
    held = sum(path.stat().st_size for path in folder.iterdir())
    assert 0 < held < 2**20
    requests = panel_event("clear_cache", dataset)
    assert f"{held / 2**10:.0f} KB in `{folder}`" in rendered(requests)["candidate_cache.size"]["default"]
    (prompt,) = prompts(requests)
    assert prompt["operator_uri"] == f"{PLUGIN}/clear_candidate_cache" and prompt["on_success"] == f"{PANEL}#refresh"
