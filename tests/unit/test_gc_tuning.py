"""The daemon's collector settings once it has started: start-up objects frozen, collections less frequent."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from daemon.lifecycle import GC_THRESHOLDS, tune_gc


@pytest.fixture
def restore_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_tune_gc_freezes_what_lives_and_raises_the_thresholds(restore_gc: None) -> None:
    long_lived = [object() for _ in range(10)]
    tune_gc()
    assert gc.get_threshold() == GC_THRESHOLDS
    assert gc.get_freeze_count() > len(long_lived)
    assert GC_THRESHOLDS[0] > 700  # CPython's default, which collected every few requests
