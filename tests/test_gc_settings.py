"""The servers' garbage-collector settings (trio_sign._gc): fewer young collections, and what
a server keeps moved out of full collections' walk."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from trio_sign._gc import configure_gc_for_serving, freeze_long_lived


@pytest.fixture
def restore_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


@pytest.mark.usefixtures("restore_gc")
def test_serving_settings_collect_the_young_generation_less_often() -> None:
    configure_gc_for_serving()
    assert gc.get_threshold() == (20_000, 10, 10)


@pytest.mark.usefixtures("restore_gc")
def test_what_is_alive_now_leaves_full_collections() -> None:
    kept = [[i] for i in range(1000)]
    before = gc.get_freeze_count()
    freeze_long_lived()
    assert gc.get_freeze_count() >= before + len(kept)


@pytest.mark.usefixtures("restore_gc")
def test_freezing_again_lets_what_died_since_be_collected() -> None:
    """The parent freezes at each enclave restart: a cycle frozen by the first call that died
    before the second is collected, not kept in the permanent generation for good."""
    import weakref

    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a  # type: ignore[attr-defined]  # a cycle: only the GC frees it
    gone = weakref.ref(a)
    freeze_long_lived()  # a and b are alive: frozen
    del a, b
    freeze_long_lived()  # the next run's
    assert gone() is None
