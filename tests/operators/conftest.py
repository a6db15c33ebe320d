"""Fixtures shared by the operator tests."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny FFTs: with 2 threads, MKL's thread hand-offs cost milliseconds per call on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
