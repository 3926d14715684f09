"""Stop (SET_VRING_ENABLE 0 + GET_VRING_BASE) and resume: no loss, no duplication."""

from __future__ import annotations

import os

import pytest
import trio

from .conftest import RX, TX, Server


async def test_bases_after_traffic(server: Server) -> None:
    async with server.running() as fe:
        drv = server.driver(fe, buf_size=1000)
        data = os.urandom(10_000)
        assert await drv.echo(data) == data
        assert await fe.stop() == {RX: 10, TX: 10}
        stopped = [e for e in server.device.events if e[0] == "stopped"]
        assert sorted(stopped) == [("stopped", RX, 10), ("stopped", TX, 10)]


async def test_chains_posted_across_a_stop_are_echoed_once(server: Server) -> None:
    """Chains made available around a stop are taken exactly once, before or after it."""
    async with server.running() as fe:
        tx = fe.queue(TX)
        drv = server.driver(fe, buf_size=256)
        assert await drv.echo(b"warm-up") == b"warm-up"
        bufs = [fe.alloc(100) for _ in range(20)]
        payload = b""
        for i, gpa in enumerate(bufs[:10]):
            chunk = bytes([i]) * 100
            fe.write(gpa, chunk)
            tx.add([(gpa, 100)])
            payload += chunk
        fe.kick(TX)
        bases = await fe.stop()
        # Made available while the back end is stopped: kicks go to an eventfd nobody reads.
        for i, gpa in enumerate(bufs[10:], start=10):
            chunk = bytes([i]) * 100
            fe.write(gpa, chunk)
            tx.add([(gpa, 100)])
            payload += chunk
        fe.kick(TX)
        assert 1 <= bases[TX] <= 11
        await fe.resume()
        done = 0
        while done < 20:
            done += len(await fe.collect_used(TX, timeout=2))
        assert await drv.receive(len(payload)) == payload
        # Nothing is left over (a duplicate would come before the marker).
        assert await drv.echo(b"!") == b"!"
        assert await fe.stop() == {TX: 1 + 20 + 1, RX: drv.completed[RX]}


@pytest.mark.parametrize("event_idx", [False, True], ids=["no-event-idx", "event-idx"])
async def test_pause_and_resume_during_a_transfer(server: Server, event_idx: bool) -> None:
    """A VM paused and resumed over and over while data flows (call eventfds replaced at
    every resume, as QEMU does)."""
    async with server.running(event_idx=event_idx, size=16) as fe:
        drv = server.driver(fe, buf_size=1024)
        data = os.urandom(512 * 1024)
        out = b""
        done = trio.Event()
        progress: list[int] = []

        async def transfer() -> None:
            nonlocal out
            out = await drv.echo(data, timeout=10)
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(transfer)
            mark = 0
            while not done.is_set():
                # Pause every ~40 chains of progress, with data in flight.
                mark += 40
                while drv.completed[TX] < mark and not done.is_set():
                    await trio.sleep(0)
                await fe.stop(pause=True)
                progress.append(drv.completed[TX])
                await trio.sleep(0.001)
                await fe.resume()
        chains = len(data) // 1024
        assert sum(0 < p < chains for p in progress) >= 3, progress
        assert out == data
        assert await fe.stop() == {RX: drv.completed[RX], TX: drv.completed[TX]}


async def test_resume_requires_stop(server: Server) -> None:
    from vhostser.testing import FrontEndError

    async with server.running() as fe:
        with pytest.raises(FrontEndError):
            await fe.resume()
        await fe.stop()
        with pytest.raises(FrontEndError):
            await fe.stop()
