"""The operator that empties the candidate cache (each image's bank-independent work, reused by
every re-segmentation; see :mod:`ntt_core.candidate_cache`)."""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from .common import call, form, product_label, require_library


def cache_summary() -> str:
    """The Memory banks panel's line on the candidate cache: its folder and the bytes it holds (the
    folder is not created to say so)."""
    from ntt_core.candidate_cache import CandidateCache, default_folder

    folder = default_folder()
    held = CandidateCache(folder).size_bytes() if folder.is_dir() else 0
    size = f"{held / 2**20:.1f} MB" if held >= 2**20 else f"{held / 2**10:.0f} KB"
    return (
        f"**Candidate cache:** {size} in `{folder}` (each image's bank-independent work, "
        "reused when images are segmented again)"
    )


class ClearCandidateCache(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="clear_candidate_cache", label=product_label("Clear candidate cache"), dynamic=True
        )

    def resolve_input(self, ctx):
        return form(ctx, "Clear candidate cache", self._form)

    def _form(self, ctx, inputs):
        folder = "$NTT_CACHE_DIR or ~/.cache/ntt/candidates"
        inputs.view("what", types.Notice(label=f"Removes every entry in {folder}; segmenting recomputes them"))

    def execute(self, ctx):
        require_library()
        from ntt_core.candidate_cache import CandidateCache, default_folder

        cache = CandidateCache(default_folder())
        return {"report": {"folder": str(cache.folder), "freed_bytes": cache.clear()}}

    def __call__(self, sample_collection):
        return call(self, sample_collection, {})
