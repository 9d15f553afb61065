"""Test configuration shared by the whole suite.

Triton kernels run on the CPU through the interpreter when no CUDA device is
present. ``TRITON_INTERPRET`` is read when ``triton`` is imported, so it is set
here, before any test module imports ``bimatting_triton.kernels``.
"""
import os

if not os.environ.get("BIMATTING_TEST_CUDA"):
    # CPU machines (CI): always interpret. Set BIMATTING_TEST_CUDA=1 on a GPU
    # machine to run the same tests through the compiled kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

REFERENCE_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference")


@pytest.fixture(scope="session")
def reference_dir() -> str:
    """Path of ``../shared/reference`` (the golden data and the state_dict layout)."""
    path = os.path.abspath(REFERENCE_DIR)
    if not os.path.isdir(path):
        pytest.fail(f"reference data not found at {path}: ../shared must sit beside the checkout")
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
