"""FiftyOne plugin of "No Time to Train!": reference-based instance segmentation in the App.

Thin operators: each parses its form and calls the modules of :mod:`ntt_core.fiftyone`. Registering
them imports neither torch nor the library's model code.
"""

from .candidate_cache import ClearCandidateCache
from .evaluation import EvaluateByReference
from .memory_banks import BuildMemoryBank, DeleteMemoryBank, ExportMemoryBank, ImportMemoryBank
from .panel import MemoryBanksPanel
from .review import AddNegativeReferences, AddToMemoryBank, RemoveFromMemoryBank, ShowMatchedReference
from .segmentation import BoxesToMasks, SegmentByReference

OPERATORS = (
    BuildMemoryBank,
    SegmentByReference,
    BoxesToMasks,
    EvaluateByReference,
    ExportMemoryBank,
    ImportMemoryBank,
    DeleteMemoryBank,
    ShowMatchedReference,
    AddToMemoryBank,
    AddNegativeReferences,
    RemoveFromMemoryBank,
    ClearCandidateCache,
    MemoryBanksPanel,
)


def register(plugin):
    for operator in OPERATORS:
        plugin.register(operator)
