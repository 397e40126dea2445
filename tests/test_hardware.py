"""Host memory: freed tensors' pages go back to the OS where training runs on the CPU."""

from __future__ import annotations

import os

import pytest
import torch

from rlkit import hardware


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.fixture
def trim_setting(monkeypatch):
    """Each test decides RLKIT_MALLOC_TRIM; the cached lookup is redone before and after."""
    hardware._malloc_trim.cache_clear()
    yield monkeypatch
    hardware._malloc_trim.cache_clear()


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc")
def test_release_returns_holes_left_by_freed_tensors(trim_setting):
    trim_setting.delenv("RLKIT_MALLOC_TRIM", raising=False)
    if hardware._malloc_trim() is None:
        pytest.skip("no glibc malloc_trim here")
    # 64 KiB tensors come from glibc's heap (below its mmap threshold); freeing every other one
    # leaves holes that free() alone cannot return, since live tensors sit above them
    tensors = [torch.ones(16 * 1024) for _ in range(6000)]
    del tensors[::2]
    before = _rss_mib()
    hardware.release_freed_host_memory(torch.device("cpu"))
    after = _rss_mib()
    assert before - after > 100, (before, after)  # ~190 MiB of holes
    assert all(float(t[0]) == 1.0 for t in tensors[::500])  # live tensors untouched


def test_release_is_off_with_the_variable_and_away_from_the_cpu(trim_setting):
    calls = []
    trim_setting.setattr(hardware, "_malloc_trim", lambda: calls.append)
    hardware.release_freed_host_memory(torch.device("cuda", 0))
    hardware.release_freed_host_memory(torch.device("meta"))
    assert calls == []
    hardware.release_freed_host_memory(torch.device("cpu"))
    assert calls == [0]
    trim_setting.undo()
    hardware._malloc_trim.cache_clear()
    trim_setting.setenv("RLKIT_MALLOC_TRIM", "0")
    assert hardware._malloc_trim() is None
