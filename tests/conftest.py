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

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest-xdist (the README's `-n auto`) the workers already use every core: one torch
    # thread each, instead of each worker's threads competing for all of them.
    torch.set_num_threads(1)

# ../shared/reference beside the checkout; BIMATTING_REFERENCE_DIR overrides it (e.g. a copy
# carried to a GPU machine, where ../shared does not travel).
REFERENCE_DIR = os.environ.get("BIMATTING_REFERENCE_DIR") or os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "reference")


@pytest.fixture(scope="session")
def reference_dir() -> str:
    """Path of ``../shared/reference`` (the golden data and the state_dict layout)."""
    path = os.path.abspath(REFERENCE_DIR)
    if not os.path.isdir(path):
        pytest.fail(f"reference data not found at {path}: ../shared must sit beside the checkout "
                    "(or set BIMATTING_REFERENCE_DIR)")
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def golden(reference_dir) -> dict:
    """``bimatting_golden.pt`` (SPEC §2): official-layout weights, clips and reference outputs."""
    return torch.load(os.path.join(reference_dir, "bimatting_golden.pt"), weights_only=True)


@pytest.fixture(scope="session")
def golden_model(golden):
    """BiMatting with the golden weights, float64, eval mode, on the CPU. Shared: do not modify."""
    from bimatting_triton import BiMatting

    model = BiMatting()
    model.load_state_dict(golden["state_dict"])
    return model.double().eval()
