"""The daemon's runtime settings once started: start-up objects frozen, fewer collections, sooner switches."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator

import pytest

from daemon.lifecycle import GC_THRESHOLDS, SWITCH_INTERVAL, tune_runtime


@pytest.fixture
def restore_gc() -> Iterator[None]:
    thresholds, interval = gc.get_threshold(), sys.getswitchinterval()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)
    sys.setswitchinterval(interval)


def test_tune_runtime_freezes_what_lives_raises_the_thresholds_and_shortens_the_switch(restore_gc: None) -> None:
    long_lived = [object() for _ in range(10)]
    tune_runtime()
    assert gc.get_threshold() == GC_THRESHOLDS
    assert gc.get_freeze_count() > len(long_lived)
    assert GC_THRESHOLDS[0] > 700  # CPython's default, which collected every few requests
    assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL)
    assert SWITCH_INTERVAL < 0.005  # CPython's default
