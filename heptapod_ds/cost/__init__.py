"""One cost model of a Heptapod config: FLOPs and bytes per part, analytic, no model code.

* :mod:`.flops` - parameter counts and forward/training FLOPs per image, per chain link (the pipeline
  split), per part (backbone, head, output), and sampling FLOPs per image.
* :mod:`.memory` - model states, activations saved for backward (with recompute, attention kernel and
  dropout masks), in-flight micro-batches and buffers per rank.
* :mod:`.recompute` - what a recompute setting recomputes (shared with the model and validation).

Config validation, the pipeline split, throughput/MFU, the bench, ``python -m heptapod_ds.presets`` and
``python -m heptapod_ds.plan`` all read these numbers; nothing here imports :mod:`heptapod_ds.model`.
"""
