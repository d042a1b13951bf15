"""``ntt demo``: the whole job on a small dataset, from nothing to the FiftyOne App.

A COCO-2017 validation subset from the FiftyOne zoo (or a local COCO folder) becomes a
persistent FiftyOne dataset; K ground-truth instances per class are tagged as references; the
plugin's operators build the memory bank, segment the other samples and evaluate them; a
summary is printed and the App opened (its URL printed when headless).

``--offline`` runs the same flow on generated scenes (:mod:`ntt_core.synthetic`) with the
stand-in models of :mod:`ntt_core.standins`. The operators load SAM2 and DINOv2 by name and
cannot take those objects, so there the bank is built and the samples segmented through the
library functions the operators call; evaluation goes through the operator in both modes.

Re-running replaces the dataset of the same name, if an earlier demo run made it.

The set-up is in :mod:`.sources` (where images and labels come from, downloads),
:mod:`.plugin_link` (making the plugin's operators findable) and :mod:`.datasets` (the demo's
dataset and the import into it); the method's steps in :mod:`.steps`; the command, its options
and its summary in :mod:`ntt_core.cli.demo`.
"""

from ..errors import NttError

GT_FIELD = "ground_truth"
PRED_FIELD = "predictions"
BANK_KEY = "demo"
EVAL_KEY = "eval"


class DemoError(NttError):
    """Something the demo needs and cannot get or use: a missing download, a foreign dataset, too few samples."""
