"""The plugin's operators run from the FiftyOne App in a real browser, each result checked through the SDK."""

from __future__ import annotations

import re

import fiftyone.operators as foo
import pytest
from app_pages import PLUGIN, expect
from fiftyone import ViewField as F
from fiftyone_scenes import field_documents, scenes_dataset

from ntt_core import fiftyone_adapter as fa

pytestmark = pytest.mark.browser


@pytest.fixture
def dataset(tmp_path, request):
    """Six generated scenes; one ground-truth instance per class tagged ``reference``."""
    dataset = scenes_dataset(tmp_path, count=6, size=(96, 128))
    dataset.name = f"browser-{request.node.name.replace('_', '-')}"
    yield dataset
    dataset.delete()


def our_operators() -> list:
    """The plugin's operators (panels are not in the operator browser)."""
    return [op for op in foo.list_operators() if op.uri.startswith(f"{PLUGIN}/") and not isinstance(op, foo.Panel)]


def tagged_counts(dataset) -> dict[str, int]:
    references = dataset.filter_labels("gt", F("tags").contains(fa.DEFAULT_REFERENCE_TAG))
    return references.count_values("gt.detections.label")


def test_operator_browser_lists_every_operator_and_builds_a_bank_from_its_form(fresh_app, dataset):
    app, server = fresh_app, fresh_app.server
    app.open(dataset)
    listing = app.operator_browser().inner_text()
    operators = our_operators()
    assert len(operators) >= 7
    for operator in operators:
        assert operator.config.label in listing and operator.name in listing, operator.uri
    assert not server.torch_loaded(), "listing the operators imported torch in the App server"

    prompt = app.operator_form("Build memory bank from reference instances")
    counts = tagged_counts(dataset)
    found = ", ".join(f"{name}: {count}" for name, count in sorted(counts.items()))
    prompt.get_by_text(f"References found per class: {found}", exact=True).wait_for()
    assert app.field(prompt, "Ground-truth field").input_value() == "gt"
    assert not server.torch_loaded(), "resolving a form imported torch in the App server"
    app.screenshot("build-form")
    gt_before = field_documents(dataset, "gt")

    app.execute(prompt)
    expect(prompt).to_contain_text(re.compile(r'key:\s*string\s*"references"'))
    app.screenshot("build-done")
    dataset.reload()
    assert dataset.list_runs() == ["references"]
    assert fa.load_memory_bank(dataset, "references").counts() == counts
    assert field_documents(dataset, "gt") == gt_before
    assert server.torch_loaded(), "the first run should have imported torch (else this probe sees nothing)"
