"""Schedules as plain objects."""

import pytest

from dinomx.schedules import CosineScheduler


def test_cosine_scheduler_warmup_freeze_and_end():
    s = CosineScheduler(1.0, 0.1, total_iters=20, warmup_iters=5, freeze_iters=3)
    assert [s[i] for i in range(3)] == [0.0, 0.0, 0.0]
    assert s[3] == 0.0 and s[7] == pytest.approx(1.0)
    assert s[8] == pytest.approx(1.0)
    assert s[19] == pytest.approx(0.1, abs=0.02)
    assert s[100] == 0.1  # past the end it holds the final value
    values = [s[i] for i in range(8, 20)]
    assert all(a >= b for a, b in zip(values, values[1:]))
