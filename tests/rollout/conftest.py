"""One torch thread for the rollout tests: their ops are tiny, and on a shared 2-core machine two OpenMP threads
mostly wait on each other. The previous setting is restored afterwards."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
