"""Shared test setup: one torch thread (the test tensors are small; oversubscribing 2 cores costs 10–100×), no
torchrun variables or terminal settings inherited from the launcher, and a private reference-solution cache per test
session."""

import os

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("FEWSTEP_THREADS", "1")  # for CLI subprocesses
# A suite started inside a torchrun job (or any launcher that exports these) still tests one process: with
# WORLD_SIZE > 1 every in-process command would try to join a process group. The torchrun tests set their own.
for _name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"):
    os.environ.pop(_name, None)
# The command's output as a pipe gets it, however pytest was started (`-s` in a terminal, FORCE_COLOR=1 in CI): rich
# writes no colour codes and wraps no line at the terminal's width (set before any test imports fewstep.cli).
os.environ["TTY_COMPATIBLE"] = "0"
os.environ["COLUMNS"] = "200"


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    os.environ["FEWSTEP_CACHE"] = str(tmp_path_factory.mktemp("fewstep-cache"))
    yield
