"""initmi: does weight initialisation change the mechanisms a small transformer learns?

The package is flat; the file list is the architecture:

- ``config``   typed, frozen experiment configuration and presets
- ``model``    the plain-PyTorch training model and its TransformerBridge view
- ``schemes``  the initialisation-scheme registry
- ``data``     the synthetic induction task and its diagnostic sets
- ``train``    training, evaluation, checkpoints, resume
- ``pipeline`` the papermill grid runner (``python -m initmi_utils.pipeline``)
"""

__version__ = "0.1.0"
