"""Local GPU assignment of `run --workers` (interrupting a run: tests/test_resume.py)."""

from __future__ import annotations

from search.workers import cpu_share, gpu_assignment


def test_gpus_round_robin_over_visible_devices():
    assert gpu_assignment(5, None, 2) == ["0", "1", "0", "1", "0"]
    assert gpu_assignment(3, "2,5", 8) == ["2", "5", "2"]
    assert gpu_assignment(2, None, 0) == [None, None]


def test_local_workers_share_the_cores():
    assert [cpu_share(n, cores=8) for n in (1, 2, 3, 16)] == [8, 4, 2, 1]
