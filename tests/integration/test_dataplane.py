"""Bytes both ways through real rings in memfd guest RAM, kicked and called with eventfds."""

from __future__ import annotations

import hashlib
import os

import pytest

from .conftest import RX, TX, Server

MIB = os.urandom(1 << 20)


@pytest.mark.parametrize("event_idx", [False, True], ids=["no-event-idx", "event-idx"])
@pytest.mark.parametrize(
    ("pieces", "indirect"),
    [(1, False), (3, False), (4, True)],
    ids=["direct", "chained", "indirect"],
)
async def test_one_mib_echo(server: Server, event_idx: bool, pieces: int, indirect: bool) -> None:
    async with server.running(event_idx=event_idx) as fe:
        drv = server.driver(fe, buf_size=4096, pieces=pieces, indirect=indirect)
        out = await drv.echo(MIB)
        assert len(out) == len(MIB)
        assert hashlib.sha256(out).digest() == hashlib.sha256(MIB).digest()
        assert drv.completed[TX] == 256
        # Every chain came back exactly once, so the device's indexes equal the driver's.
        assert await fe.stop() == {RX: drv.completed[RX], TX: 256}


@pytest.mark.parametrize("event_idx", [False, True], ids=["no-event-idx", "event-idx"])
async def test_ring_index_wraps(server: Server, event_idx: bool) -> None:
    """Rings that start near 2^16 (a resumed device) carry on through the wrap."""
    async with server.running(event_idx=event_idx, size=8, base=0xFFF0) as fe:
        drv = server.driver(fe, buf_size=512)
        data = os.urandom(64 * 512 + 100)
        assert await drv.echo(data) == data
        bases = await fe.stop()
        assert bases == {
            RX: (0xFFF0 + drv.completed[RX]) & 0xFFFF,
            TX: (0xFFF0 + drv.completed[TX]) & 0xFFFF,
        }
        assert bases[TX] < 0xFFF0


async def test_interrupt_suppression_with_event_idx(server: Server) -> None:
    """With EVENT_IDX the device signals far fewer calls than chains for a bulk transfer."""
    async with server.running(event_idx=True) as fe:
        calls = 0
        wait_call = fe.wait_call

        async def counting_wait_call(index: int, timeout: float = 5.0) -> int:
            nonlocal calls
            calls += 1
            return await wait_call(index, timeout)

        fe.wait_call = counting_wait_call  # type: ignore[method-assign]
        drv = server.driver(fe)
        assert await drv.echo(MIB) == MIB
        assert calls < drv.completed[TX] + drv.completed[RX]
