"""``ntt``: the COCO-folder workflow from the command line.

    ntt sample-references --annotations A.json --shots K --seed S --out refs.json
    ntt build-memory --references refs.json --images DIR --out BANK_DIR
    ntt predict --memory BANK_DIR --images DIR [--targets T.json] --out results.json
    ntt evaluate --targets T.json --results results.json [--classes few-shot]
    ntt demo [--offline]      (the whole job on a small dataset, in FiftyOne; see ntt_core.demo)
    ntt models download|list|files   (the weights ahead of time)
    ntt shards DATASET        (the shards of sharded runs and their heartbeats)

Exit status: 0 done; 1 every image failed (nothing written); 2 bad input, refused before any
work with one line ``ntt: error: <reason>``; 3 done, but some images were skipped (their count
and first reasons on stderr); 130 interrupted (Ctrl-C; ``predict`` resumes with ``--resume``).

One module per command (``sample_references``, ``build_memory``, ``predict``, ``evaluate``,
``demo``, ``models``, ``shards``), each with its ``add_parser`` and its ``run``; :mod:`.options`
holds the argument types, the errors, the exit statuses and the options several commands share,
:mod:`.output` what the commands write, :mod:`.program` the parser and :func:`main`. The commands
load the models inside ``run``, so ``ntt --help`` loads none.
"""

from .options import EXIT_ALL_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_OK, EXIT_SOME_SKIPPED
from .program import build_parser, main

__all__ = [
    "EXIT_ALL_FAILED",
    "EXIT_BAD_INPUT",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_SOME_SKIPPED",
    "build_parser",
    "main",
]
