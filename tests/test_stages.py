"""Stage labels: what torch.profiler and an observing hook see."""

import contextlib

import pytest
import torch

from ntt_core.stages import observe, stage


class Recorder:
    """A stage hook that records ("enter"/"exit", name, items) events."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, int | None]] = []

    @contextlib.contextmanager
    def __call__(self, name, items):
        self.events.append(("enter", name, items))
        try:
            yield
        finally:
            self.events.append(("exit", name, items))


def test_a_stage_is_a_profiler_label_around_its_operations():
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        with stage("matching", items=7):
            torch.ones(3).add_(1)
    events = profile.events()
    (label,) = [e for e in events if e.name == "ntt.matching"]
    (add,) = [e for e in events if e.name == "aten::add_"]
    assert label.time_range.start <= add.time_range.start and add.time_range.end <= label.time_range.end


def test_the_hook_sees_nested_stages_in_order_and_only_inside_observe():
    recorder = Recorder()
    with stage("decode"):  # no hook: nothing recorded
        pass
    with observe(recorder):
        with stage("mask_postprocess"):
            with stage("prompt_decoding", items=4):
                pass
    with stage("merge"):
        pass
    assert recorder.events == [
        ("enter", "mask_postprocess", None),
        ("enter", "prompt_decoding", 4),
        ("exit", "prompt_decoding", 4),
        ("exit", "mask_postprocess", None),
    ]


def test_an_error_inside_a_stage_leaves_it_and_the_hook():
    recorder = Recorder()
    with pytest.raises(ValueError, match="bad"):
        with observe(recorder), stage("nms"):
            raise ValueError("bad")
    assert recorder.events == [("enter", "nms", None), ("exit", "nms", None)]
    with stage("nms"):
        pass
    assert len(recorder.events) == 2
