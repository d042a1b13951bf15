"""The FiftyOne side of the method, one module per workflow (the only part of ``ntt_core``, with
:mod:`ntt_core.shards` and the demo, that imports ``fiftyone``):

- :mod:`.fields`: image collections, ``Detections`` fields, new names, protected ground truth;
- :mod:`.references`: references out of a dataset's ground truth;
- :mod:`.bank_runs`: memory banks stored as runs (method ``ntt_memory_bank``);
- :mod:`.building`: building a bank from a dataset;
- :mod:`.predictions`: prediction records (runs ``segmentation_<field>``), resuming, shards,
  the predictor as a FiftyOne ``Model``;
- :mod:`.labels`: ``Instances`` -> ``fo.Detections``, boxes -> masks;
- :mod:`.evaluation`: FiftyOne's COCO evaluation plus pycocotools figures;
- :mod:`.review`: the review loop (bank overview, matched references, bank edits).

Ground truth is only ever read. Nothing is imported here: the plugin imports the modules it
needs inside the operators' methods, so listing it imports no torch.
"""
