"""Suite-wide settings: tiny models run fastest on one thread, and the CI machine has two shared cores."""

import pytest
import torch

from vlbridge.utils.threads import torch_threads

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts on one thread and cannot leave another count to the next (a test wanting more sets it
    inside): in-process references and subprocesses started with OMP_NUM_THREADS=1 then sum in the same order."""
    with torch_threads(1):
        yield
