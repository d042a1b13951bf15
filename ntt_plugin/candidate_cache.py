"""The operator that empties the candidate cache (each image's bank-independent work, reused by
every re-segmentation; see :mod:`ntt_core.candidate_cache`)."""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from .common import call, form, product_label, require_library


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
