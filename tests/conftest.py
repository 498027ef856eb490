"""Test-suite setup shared by every test module.

Without a GPU, Triton kernels run on CPU tensors under its interpreter: TRITON_INTERPRET must be set
before any kernel module is imported, so it is set here, first.
"""

import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
