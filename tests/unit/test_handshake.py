"""The control handshake table (vhostser.console.handshake): total, and the rules Linux's
virtio_console relies on."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhostser.console.handshake import (
    TABLE,
    Announce,
    HandshakeEffect,
    HandshakeError,
    HandshakeInput,
    transition,
)

A, In, E = Announce, HandshakeInput, HandshakeEffect


def test_the_table_is_total() -> None:
    assert set(TABLE) == set(itertools.product(Announce, HandshakeInput))


def test_a_missing_pair_is_an_error() -> None:
    saved = TABLE.pop((A.READY, In.RESET))
    try:
        with pytest.raises(HandshakeError, match="no handshake transition from ready on reset"):
            transition(A.READY, In.RESET)
    finally:
        TABLE[(A.READY, In.RESET)] = saved


@pytest.mark.parametrize("announce", list(Announce))
def test_port_open_counts_only_once_set_up(announce: Announce) -> None:
    step = transition(announce, In.GUEST_PORT_OPEN)
    assert step.announce is announce
    expected = E.ACCEPT_OPEN if announce is A.READY else E.REJECT_OPEN
    assert step.effects == (expected,)


@pytest.mark.parametrize("announce", list(Announce))
def test_port_ready_is_answered_in_every_state(announce: Announce) -> None:
    # Linux re-sends PORT_READY after freeze/restore, without a new DEVICE_READY.
    assert transition(announce, In.PORT_READY) == transition(A.UNKNOWN, In.PORT_READY)
    assert transition(announce, In.PORT_READY).effects == (E.ANNOUNCE,)
    assert transition(announce, In.PORT_READY).announce is A.READY


@pytest.mark.parametrize("announce", list(Announce))
def test_reset_forgets_everything(announce: Announce) -> None:
    assert transition(announce, In.RESET).announce is A.UNKNOWN
    assert transition(announce, In.RESET).effects == ()


@pytest.mark.parametrize(
    ("announce", "device_remove"),
    [(A.UNKNOWN, False), (A.ADD_QUEUED, False), (A.ADDED, True), (A.READY, True)],
)
def test_removal_undoes_only_what_the_guest_has(announce: Announce, device_remove: bool) -> None:
    step = transition(announce, In.REMOVE)
    assert step.announce is A.UNKNOWN
    assert E.DROP_QUEUED in step.effects
    assert (E.QUEUE_DEVICE_REMOVE in step.effects) is device_remove


def test_device_add_is_queued_once_per_driver_init() -> None:
    assert transition(A.UNKNOWN, In.DRIVER_READY).effects == (E.QUEUE_DEVICE_ADD,)
    for announce in (A.ADD_QUEUED, A.ADDED, A.READY):
        assert transition(announce, In.DRIVER_READY).effects == ()


@given(st.lists(st.sampled_from(list(HandshakeInput)), max_size=60))
def test_any_sequence(inputs: list[HandshakeInput]) -> None:
    """Whatever the guest sends: a guest PORT_OPEN is accepted exactly when the port was set
    up since the last reset or removal, and DEVICE_REMOVE only follows a delivered ADD."""
    announce = A.UNKNOWN
    set_up = delivered = False
    for inp in inputs:
        step = transition(announce, inp)
        if inp is In.GUEST_PORT_OPEN:
            assert (E.ACCEPT_OPEN in step.effects) is set_up
        if E.QUEUE_DEVICE_REMOVE in step.effects:
            assert delivered or set_up
        if inp is In.PORT_READY:
            set_up = True
        elif inp is In.ADD_DELIVERED and announce is A.ADD_QUEUED:
            delivered = True
        elif inp in (In.RESET, In.REMOVE):
            set_up = delivered = False
        announce = step.announce
        assert (announce is A.READY) is set_up
