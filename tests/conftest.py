import os

import pytest
import torch

# Tests are small: one thread avoids oversubscription when several torch processes share 2 cores.
torch.set_num_threads(int(os.environ.get("MANLEARN_TEST_THREADS", "1")))


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 16, 16, generator=g)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    return x, y
