"""Shared test setup: one torch thread (the test tensors are small; oversubscribing 2 cores costs 10–100×)
and a private reference-solution cache per test session."""

import os

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("FEWSTEP_THREADS", "1")  # for CLI subprocesses


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    os.environ["FEWSTEP_CACHE"] = str(tmp_path_factory.mktemp("fewstep-cache"))
    yield
