"""What a long-running process sets up once its long-lived objects are built."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from memberhub.kit.startup import YOUNG_COLLECTION_THRESHOLD, long_lived


@pytest.fixture
def collector_settings() -> Iterator[None]:
    """The test process's own thresholds back afterwards."""
    threshold, enabled = gc.get_threshold(), gc.isenabled()
    yield
    gc.set_threshold(*threshold)
    (gc.enable if enabled else gc.disable)()


@pytest.mark.usefixtures("collector_settings")
def test_long_lived_objects_are_frozen_and_young_ones_collected_in_larger_batches() -> None:
    gc.set_threshold(700, 10, 10)  # the interpreter's defaults
    frozen_before = gc.get_freeze_count()

    with long_lived():
        assert not gc.isenabled()  # no collection while the application is built
        kept = [{"built": n} for n in range(100)]

    assert gc.get_freeze_count() >= frozen_before + len(kept)
    assert gc.isenabled()
    assert gc.get_threshold() == (YOUNG_COLLECTION_THRESHOLD, 10, 10)
