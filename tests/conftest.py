"""Test setup: Triton runs under its interpreter when there is no GPU (set before any import)."""
import os

try:
    import torch

    _cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton_interp  # noqa: E402

    triton_interp.fix_index_for_numpy_2_4()  # Triton 3.6's interpreter with numpy >= 2.4

import pytest  # noqa: E402
import torch  # noqa: E402

# One torch thread: the tests are many tiny ops, which two threads only slow down here.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
