"""Shared pytest setup."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """torch on one intra-op thread while a test runs.

    The tests' models are tiny and gain nothing from threads, while on a shared two-core machine
    intra-op threads spin against the other processes (3 in-process fairseq updates measured 7 s with
    2 threads, 0.1 s with 1); it is also what the tests' DDP workers use.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
