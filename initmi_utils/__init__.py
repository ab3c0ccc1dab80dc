"""initmi: does weight initialisation change the mechanisms a small transformer learns?

The package is flat; the file list is the architecture, in layers (a module imports only from
layers below its own; ``tests/test_layers.py`` and the import-linter contract in
``pyproject.toml`` enforce it):

1. ``config`` (typed frozen config, presets, run paths), ``io`` (atomic writes), ``stats``
   (intervals and tests; numpy and scipy only)
2. ``model`` (training model, TransformerBridge view), ``data`` (synthetic task)
3. ``schemes`` (the init-scheme registry, base schemes, mimetic)
4. ``checkpoints`` (self-describing safetensors), ``tables`` (one long-format schema)
5. ``seeded`` (the scheme that embeds a trained donor, loaded, never trained here)
6. analyses: ``behavior``, ``attention``, ``offsets``, ``ablation``, ``logit_lens``,
   ``geometry``, ``circuits``, ``donor_persistence``, and ``handbuilt`` (known-answer models)
7. ``train`` (training, the loss ladder, resume), ``donor`` (trains the seeded scheme's donor)
8. the comparison: ``report`` and ``plots``, ``head_browser`` (a run's heads across training),
   ``inference`` (test tables), ``study`` (loading the runs), ``rq1``, ``rq2``, ``rq3`` (one per
   research question), ``findings`` (their answers in sentences), ``compare``
9. ``pipeline`` (the papermill grid runner, ``python -m initmi_utils.pipeline``)

Importing the package has no side effects.
"""

__version__ = "0.1.0"
