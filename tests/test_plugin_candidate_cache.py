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


def test_a_cached_run_keeps_its_own_figure_and_the_estimate_shows_it(dataset, models, tmp_path, monkeypatch):
    from ntt_core.fiftyone.timings import cached_key, estimate, seconds_per_image, timing_key

    monkeypatch.setenv("NTT_CACHE_DIR", str(tmp_path / "cache"))
    grid = 5  # a grid no other plugin test runs: no figure is kept for it yet
    run = dict(**{**FAST, "points_per_side": grid}, **models)
    key = timing_key("cpu", models["sam2"], models["dinov2"], grid)
    foo.get_operator(f"{PLUGIN}/build_memory_bank")(dataset, "gt", **models)
    foo.get_operator(f"{PLUGIN}/segment_by_reference")(dataset, "references", "pred", **run)
    uncached = seconds_per_image(key)
    assert uncached is not None and seconds_per_image(cached_key(key)) is None
    assert "candidate cache" not in estimate(key, 4)[1]
    foo.get_operator(f"{PLUGIN}/segment_by_reference")(dataset, "references", "pred", overwrite=True, **run)
    cached = seconds_per_image(cached_key(key))
    assert cached is not None and seconds_per_image(key) == uncached  # the cached run left the first figure alone
    assert f"from the candidate cache at {cached:.1f} s each" in estimate(key, 4)[1]


def test_a_mixed_run_charges_its_cached_images_at_the_cached_figure(tmp_path):
    from ntt_core.fiftyone.timings import cached_key, record_run, seconds_per_image

    key = f"mixed-{tmp_path.name}"
    record_run(key, 2.0, 2, 2)  # two images from the cache: 1 s each
    assert seconds_per_image(key) is None and seconds_per_image(cached_key(key)) == 1.0
    record_run(key, 21.0, 3, 1)  # one of them cached (1 s), two computed: 10 s each
    assert seconds_per_image(key) == 10.0 and seconds_per_image(cached_key(key)) == 1.0
