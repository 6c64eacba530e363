"""Reward-model tests run their tiny models on one torch thread: on a CPU shared with other jobs, a second thread
mostly spins in OpenMP barriers (measured 4x slower for small batches on our 2-core machines)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
