import os

import pytest
import torch

# Never let a test wait on hub retries: everything here is offline by design.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def one_thread():
    """Tiny networks on the shared two-core CPU run faster on one thread than on contended intra-op threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
