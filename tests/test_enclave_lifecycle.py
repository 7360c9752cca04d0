"""The enclave lifecycle's state machine: the table, every legal move, illegal moves raise."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_sign._errors import InternalError
from trio_sign.enclave import (
    TRANSITIONS,
    EnclaveEvent,
    EnclaveLifecycle,
    EnclaveState,
    LifecycleError,
)
from trio_sign.nitro._channel import STATES

S = EnclaveState
E = EnclaveEvent


def test_the_table_is_exactly_the_documented_one() -> None:
    assert dict(TRANSITIONS) == {
        (S.BOOTING, E.PRELOAD): S.PRELOADING,
        (S.BOOTING, E.STOP): S.EXITING,
        (S.BOOTING, E.FAIL): S.FAILED,
        (S.PRELOADING, E.READY): S.SERVING,
        (S.PRELOADING, E.STOP): S.EXITING,
        (S.PRELOADING, E.FAIL): S.FAILED,
        (S.SERVING, E.DRAIN): S.DRAINING,
        (S.SERVING, E.STOP): S.EXITING,
        (S.SERVING, E.FAIL): S.FAILED,
        (S.DRAINING, E.UNDRAIN): S.SERVING,
        (S.DRAINING, E.STOP): S.EXITING,
        (S.DRAINING, E.FAIL): S.FAILED,
        (S.EXITING, E.EXIT): S.EXITED,
        (S.FAILED, E.EXIT): S.EXITED,
    }
    with pytest.raises(TypeError):
        TRANSITIONS[S.EXITED, E.PRELOAD] = S.BOOTING  # type: ignore[index]


def test_state_strings_are_the_status_channels() -> None:
    """The parent and the docs depend on these strings: ``exited`` is an ``exit`` frame."""
    assert {s.wire for s in EnclaveState} - {None} == STATES
    assert S.EXITED.wire is None
    assert [s.value for s in EnclaveState] == [
        "booting",
        "preloading",
        "serving",
        "draining",
        "exiting",
        "failed",
        "exited",
    ]


def _reach(state: EnclaveState) -> EnclaveLifecycle:
    """A lifecycle driven to ``state`` along legal moves."""
    paths: dict[EnclaveState, list[EnclaveEvent]] = {
        S.BOOTING: [],
        S.PRELOADING: [E.PRELOAD],
        S.SERVING: [E.PRELOAD, E.READY],
        S.DRAINING: [E.PRELOAD, E.READY, E.DRAIN],
        S.EXITING: [E.PRELOAD, E.READY, E.DRAIN, E.STOP],
        S.FAILED: [E.FAIL],
        S.EXITED: [E.STOP, E.EXIT],
    }
    machine = EnclaveLifecycle()
    for event in paths[state]:
        machine.process(event)
    assert machine.state is state
    return machine


def _by_name(pair: tuple[EnclaveState, EnclaveEvent]) -> tuple[str, str]:
    return pair[0].value, pair[1].value


LEGAL = sorted(TRANSITIONS, key=_by_name)


@pytest.mark.parametrize(("state", "event"), LEGAL)
def test_every_legal_transition(state: EnclaveState, event: EnclaveEvent) -> None:
    machine = _reach(state)
    assert machine.can(event)
    assert machine.process(event) is TRANSITIONS[state, event]
    assert machine.state is TRANSITIONS[state, event]
    assert machine.history[-2:] == [state, TRANSITIONS[state, event]]


ILLEGAL = sorted(
    (pair for pair in itertools.product(EnclaveState, EnclaveEvent) if pair not in TRANSITIONS),
    key=_by_name,
)


@pytest.mark.parametrize(("state", "event"), ILLEGAL)
def test_every_illegal_transition_raises_and_changes_nothing(
    state: EnclaveState, event: EnclaveEvent
) -> None:
    machine = _reach(state)
    history = list(machine.history)
    assert not machine.can(event)
    with pytest.raises(LifecycleError) as info:
        machine.process(event)
    assert isinstance(info.value, InternalError)  # a bug: the enclave exits INTERNAL
    assert (info.value.state, info.value.event) == (state, event)
    assert repr(event.value) in str(info.value)
    assert repr(state.value) in str(info.value)
    assert machine.state is state
    assert machine.history == history


def test_a_gateway_drain_can_be_undone_many_times() -> None:
    machine = _reach(S.SERVING)
    for _ in range(3):
        machine.process(E.DRAIN)
        machine.process(E.UNDRAIN)
    assert machine.state is S.SERVING
    with pytest.raises(LifecycleError):
        machine.process(E.UNDRAIN)  # not draining


def test_illegal_examples_name_what_is_allowed() -> None:
    with pytest.raises(LifecycleError, match=r"'drain' is not allowed in state 'preloading'"):
        _reach(S.PRELOADING).process(E.DRAIN)
    with pytest.raises(LifecycleError, match=r"allowed: nothing"):
        _reach(S.EXITED).process(E.STOP)
    with pytest.raises(LifecycleError, match=r"allowed: fail, preload, stop"):
        EnclaveLifecycle().process(E.READY)


@given(st.lists(st.sampled_from(list(EnclaveEvent)), max_size=30))
@settings(max_examples=500)
def test_random_event_sequences(events: list[EnclaveEvent]) -> None:
    """Whatever happens, the machine follows the table exactly, never leaves ``exited``,
    passes through at most one final state, and only ever refuses without changing."""
    machine = EnclaveLifecycle()
    model = S.BOOTING
    for event in events:
        expected = TRANSITIONS.get((model, event))
        if expected is None:
            with pytest.raises(LifecycleError):
                machine.process(event)
        else:
            assert machine.process(event) is expected
            model = expected
        assert machine.state is model
    history = machine.history
    assert history[0] is S.BOOTING
    assert all(b is TRANSITIONS[a, e] for a, b, e in _steps(history))
    finals = [s for s in history if s in (S.EXITING, S.FAILED)]
    assert len(finals) <= 1
    if S.EXITED in history:
        assert history[-1] is S.EXITED
        assert history[-2] in (S.EXITING, S.FAILED)
    # boot happens once: booting and preloading never come back; serving only after preloading
    assert history.count(S.BOOTING) == 1
    assert history.count(S.PRELOADING) <= 1
    if S.SERVING in history:
        assert history.index(S.PRELOADING) < history.index(S.SERVING)


def _steps(
    history: list[EnclaveState],
) -> list[tuple[EnclaveState, EnclaveState, EnclaveEvent]]:
    out = []
    for a, b in itertools.pairwise(history):
        (event,) = [e for (s, e), t in TRANSITIONS.items() if s is a and t is b]
        out.append((a, b, event))
    return out


def test_repr() -> None:
    assert repr(EnclaveLifecycle()) == "<EnclaveLifecycle booting>"
