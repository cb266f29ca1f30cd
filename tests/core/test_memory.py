"""Memory sizes, budgets and the peak-memory meter."""

from __future__ import annotations

import time

import pytest
import torch

from lmscope.core.errors import LmscopeError
from lmscope.core.memory import PeakMemory, budget, free_memory, parse_size


def test_sizes():
    assert parse_size("300MB") == 300 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5gb") == 1_500_000_000
    assert parse_size(123) == 123 and parse_size("123") == 123
    with pytest.raises(LmscopeError, match="bad memory size"):
        parse_size("cpu:1GB")


def test_budget_from_max_memory_or_free_memory():
    cpu = torch.device("cpu")
    assert budget(cpu, "1GB") == 10**9
    assert budget(cpu, {"cpu": "2GB", 0: "20GB"}) == 2 * 10**9
    assert 0 < budget(cpu) <= free_memory(cpu)


def test_peak_memory_sees_a_known_allocation():
    """A 400 MB tensor made and freed inside the block (held for 50 ms, many sampling periods):
    the peak is about 400 MB above the start (other memory freed during the block, e.g. by other
    threads, can lower the measured rise a little)."""
    with PeakMemory("cpu") as peak:
        x = torch.ones(100_000_000)  # 400 MB, touched
        time.sleep(0.05)
        del x
    assert 0.8 * 4e8 < peak.peak < 1.3 * 4e8
