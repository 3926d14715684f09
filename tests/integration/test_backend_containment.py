"""A backend that raises is its port's failure alone: whichever callback raised, the device,
the control ring and every other port go on; the failure is counted and logged, the port's
host side detached, and a new backend (from the port's factory) starts after a backoff and
hears the open session again. Real rings, front end and guest driver (console_harness)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

import pytest
import trio

from vhostser.backends.simple import RecordingBackend
from vhostser.console import ConsoleDevice, PortConfig, Session
from vhostser.console.session import Reason

from .console_harness import Rig, console_rig, echo_ports, echo_roundtrip, eventually

HOT = PortConfig(3, "org.test.flaky")


class Flaky(RecordingBackend):
    """Attaches a host peer at once; raises BrokenPipeError (as the stdout backend does when
    its reader went away) from the callbacks named in `fail_in`."""

    def __init__(self, fail_in: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.fail_in = fail_in

    def _maybe_fail(self, call: str) -> None:
        if call in self.fail_in:
            raise BrokenPipeError(32, f"Broken pipe (in {call})")

    def guest_data(self, data: bytes) -> bool:
        if b"boom" in data:
            self._maybe_fail("guest_data")
        return super().guest_data(data)

    def session_opened(self, session: Session) -> None:
        super().session_opened(session)
        self._maybe_fail("session_opened")

    def session_closed(self, session: Session, reason: Reason) -> None:
        super().session_closed(session, reason)
        self._maybe_fail("session_closed")

    def reopen(self) -> None:
        self._maybe_fail("reopen")

    async def run(self) -> None:
        self._maybe_fail("run")
        self.port.host_attach()
        await trio.sleep_forever()


def factory(*fail_in: str) -> tuple[list[Flaky], Callable[[], Flaky]]:
    """The backends made so far, and a factory whose first backend fails in `fail_in` and
    whose later ones do not."""
    made: list[Flaky] = []

    def make() -> Flaky:
        made.append(Flaky(frozenset(fail_in) if not made else frozenset()))
        return made[-1]

    return made, make


async def echo_works(rig: Rig) -> bool:
    echo = rig.guest(1)
    if not echo.guest_open:
        await echo.open()
    return await echo_roundtrip(echo, b"x" * 50_000) == b"x" * 50_000


async def hot_port(rig: Rig, make: Callable[[], Flaky]) -> None:
    rig.device.add_port(HOT, make(), remake=make)
    port = await rig.driver.wait_port(HOT.name)
    await rig.driver.wait_for(lambda: port.host_connected)


async def test_guest_data_raising_drops_that_chain_and_restarts_the_backend(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "vhostser")
    made, make = factory("guest_data")
    async with console_rig(nursery, ports=echo_ports()) as rig:
        await hot_port(rig, make)
        guest = rig.guest(3)
        await guest.open()
        await guest.write_all(b"hello ")
        await guest.drain()
        await guest.write_all(b"boom")
        await guest.drain()  # the chain was completed, not left hanging
        dev = rig.dev(3)
        assert dev.counters.discarded["backend-failed"] == 4
        assert dev.counters.backend_failures == rig.device.counters.backend_failures == 1
        # The failed backend is not called again, the port's host side goes, then comes back
        # with a new backend that hears the open session (a replay).
        await eventually(lambda: len(made) == 2 and dev.state.host_open, timeout=5)
        assert made[1].events == [("open", 1, "")]
        await rig.driver.wait_for(lambda: guest.host_connected)
        await guest.write_all(b"after")
        await guest.drain()
        assert made[0].data == {1: bytearray(b"hello ")}
        assert made[1].data == {1: bytearray(b"after")}
        # The ledger: every guest byte delivered or dropped with a reason, never both.
        assert dev.counters.bytes_from_guest == len(b"hello after")
        assert dev.counters.buffers_from_guest == 2
        # Every other port, and the control ring, never noticed.
        assert await echo_works(rig)
        assert rig.guest(2).host_connected is False
        await guest.close()
        await eventually(lambda: ("close", 1, "guest-close") in made[1].events)
    text = caplog.text
    assert "port 3 'org.test.flaky': backend <" in text
    assert "failed in guest_data (failure 1 on this port); its host side is detached" in text
    assert "BrokenPipeError" in text
    assert "port 3 'org.test.flaky': backend restarted (failure 1 in a row)" in text


async def test_a_raising_session_callback_leaves_the_session_to_the_next_backend(
    nursery: trio.Nursery,
) -> None:
    made, make = factory("session_opened")
    async with console_rig(nursery, ports=echo_ports()) as rig:
        await hot_port(rig, make)
        guest = rig.guest(3)
        await guest.open()  # the first backend raises hearing it
        dev = rig.dev(3)
        await eventually(lambda: len(made) == 2 and dev.state.host_open, timeout=5)
        assert dev.session is not None and dev.session.id == 1
        assert made[1].events == [("open", 1, "")]
        await rig.driver.wait_for(lambda: guest.host_connected)
        await guest.write_all(b"kept")
        await guest.drain()
        assert made[1].data == {1: bytearray(b"kept")}
        assert dev.counters.backend_failures == 1
        assert dev.counters.discarded == {}


async def test_reopen_and_counter_values_raising_are_contained(nursery: trio.Nursery) -> None:
    made, make = factory("reopen")
    async with console_rig(nursery, ports=echo_ports()) as rig:
        await hot_port(rig, make)
        rig.device.reopen_backends()  # SIGHUP: the flaky one raises, the others reopen
        assert rig.device.counters.backend_failures == 1
        await eventually(lambda: len(made) == 2 and rig.dev(3).state.host_open, timeout=5)

        def broken() -> dict[str, object]:
            raise RuntimeError("counter_values broke")

        made[1].counter_values = broken  # type: ignore[method-assign]
        assert rig.device.backend_counters(3) == {}
        assert rig.dev(3).counters.backend_failures == 2
        assert await echo_works(rig)


async def test_a_run_that_keeps_failing_is_restarted_with_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    starts: list[float] = []

    class Broken(RecordingBackend):
        async def run(self) -> None:
            starts.append(trio.current_time())
            raise OSError("cannot listen")

    async with trio.open_nursery() as nursery:
        device = ConsoleDevice(nursery, max_ports=2)
        port = device.add_port(PortConfig(1, "org.test.broken"), Broken(), remake=Broken)
        device.add_port(PortConfig(0, "", console=True), RecordingBackend())
        await trio.sleep(30)
        gaps = [round(b - a, 3) for a, b in itertools.pairwise(starts)]
        assert gaps[:7] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0]
        assert set(gaps[7:]) == {5.0}
        assert port.counters.backend_failures == len(starts)
        assert device.counters.backend_failures == len(starts)
        # Removing the port ends the restarts.
        device.remove_port(1)
        before = len(starts)
        await trio.sleep(30)
        assert len(starts) == before
        nursery.cancel_scope.cancel()


async def test_without_a_factory_the_port_stays_without_host_side(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    async with console_rig(nursery, ports=echo_ports()) as rig:
        backend = Flaky(frozenset({"guest_data"}))
        rig.device.add_port(HOT, backend)
        guest = await rig.driver.wait_port(HOT.name)
        await rig.driver.wait_for(lambda: guest.host_connected)
        await guest.open()
        await guest.write_all(b"boom")
        await rig.driver.wait_for(lambda: not guest.host_connected)
        assert rig.dev(3).counters.discarded["backend-failed"] == 4
        assert "no new backend can be made; the port has no host side now" in caplog.text
        assert await echo_works(rig)
