"""Fixtures shared by the model tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions and FFTs: thread hand-offs cost more than the work on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
