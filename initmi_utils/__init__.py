"""initmi: does weight initialisation change the mechanisms a small transformer learns?

The package is flat; the file list is the architecture:

- ``config``   typed, frozen experiment configuration and presets
- ``model``    the plain-PyTorch training model and its TransformerBridge view
- ``schemes``  the initialisation-scheme registry
- ``data``     the synthetic induction task and its diagnostic sets
- ``train``    training, evaluation, checkpoints, resume
- ``pipeline`` the papermill grid runner (``python -m initmi_utils.pipeline``)

Importing the package keeps freed heap memory in the process (``keep_freed_memory``), which
saves CPU training and analysis the page faults of re-allocating activations; set
``INITMI_MALLOC=default`` to opt out.
"""

import ctypes
import os

__version__ = "0.1.0"

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> bool:
    """Tell glibc to reuse freed activation memory instead of returning it to the kernel.

    A training step allocates and frees activations of 1-8 MB (``[batch, pos, d_mlp]``
    floats). With glibc's defaults such blocks are ``mmap``-ed and unmapped, or trimmed off the
    heap top, so the next step page-faults them back in, zero-filled: 2,000-3,500 minor faults
    per batch-64 training step and 7,000-18,000 per ``train.evaluate``, measured. Serving blocks
    up to 32 MB from the heap and never trimming it leaves ~100 faults per step; how many faults
    remain with glibc's defaults depends on the machine (kernel huge pages, glibc's dynamic mmap
    threshold), so ``tests/test_model.py`` checks the policy itself on a step's allocation pattern
    through ``malloc``: 0 faults against ~27,000 per step. Step time relative to a 2048^3 matmul
    timed in the same process, alternating processes on a quiet machine: batch 32 (the presets')
    0.60 vs 0.68 without, batch 64 1.24 vs 1.27 (``benchmarks/README.md``). The price is that the
    process keeps its peak heap. Returns whether glibc took the settings (``False`` on other C
    libraries, where nothing is changed).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, 32 << 20),  # glibc's maximum; larger blocks are still mmap-ed
        (_M_TRIM_THRESHOLD, 1 << 30),
        (_M_TOP_PAD, 64 << 20),
    ))


if os.environ.get("INITMI_MALLOC", "") != "default":
    keep_freed_memory()
