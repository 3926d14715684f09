"""Fds of the wrong kind, and eventfds that could block, handed to a real daemon process over
its real vhost-user socket (SCM_RIGHTS): each is refused or neutralised at receipt, the daemon
stays up and answers, names the case in its log and counts it. Before, a regular file as a kick
fd made epoll raise in the kick watcher and killed the daemon; a blocking kick eventfd drained
by the front end froze it in read(2); a blocking call eventfd at its maximum in write(2)."""

from __future__ import annotations

import os
import signal

import pytest
import trio

from vhostser.testing import AckError
from vhostser.testing.console_driver import rx_queue, tx_queue
from vhostser.testing.hostile import FD_MAKERS
from vhostser.vhost_user import Request
from vhostser.vhost_user.messages import VringFile

from .console_harness import echo_roundtrip, streaming
from .daemon_process import DaemonProcess, daemon_process, echo_works, guest, open_ports

MAX_COUNT = 0xFFFF_FFFF_FFFF_FFFE  # an eventfd's largest count: one more write would block


WRONG: dict[str, tuple[Request, str, str]] = {
    "kick-regular-file": (Request.SET_VRING_KICK, "regular-file", "a regular file"),
    "kick-dead-pipe": (Request.SET_VRING_KICK, "dead-pipe", "a pipe"),
    "kick-socket": (Request.SET_VRING_KICK, "stream-socket", "a socket (AF_UNIX, SOCK_STREAM)"),
    "call-regular-file": (Request.SET_VRING_CALL, "regular-file", "a regular file"),
    "call-dead-pipe": (Request.SET_VRING_CALL, "dead-pipe", "a pipe"),
    "err-socket": (Request.SET_VRING_ERR, "stream-socket", "a socket (AF_UNIX, SOCK_STREAM)"),
    "backend-channel-eventfd": (Request.SET_BACKEND_REQ_FD, "eventfd", "an eventfd"),
    "backend-channel-regular-file": (Request.SET_BACKEND_REQ_FD, "regular-file",
                                     "a regular file"),
    "backend-channel-dead-pipe": (Request.SET_BACKEND_REQ_FD, "dead-pipe", "a pipe"),
    "backend-channel-datagram": (Request.SET_BACKEND_REQ_FD, "dgram-socket",
                                 "a socket (AF_UNIX, SOCK_DGRAM)"),
}


@pytest.mark.parametrize("case", WRONG, ids=WRONG)
async def test_an_fd_of_the_wrong_kind_is_refused_at_receipt(case: str) -> None:
    request, kind, what = WRONG[case]
    index = tx_queue(1)  # a running ring: the kick watcher waits on its kick fd
    with daemon_process() as d:
        async with guest(d) as (fe, driver):
            (port,) = await open_ports(driver, "org.test.one")
            assert await echo_roundtrip(port, b"before" * 1000) == b"before" * 1000
            fd = FD_MAKERS[kind](d.tmp)
            payload = b"" if request is Request.SET_BACKEND_REQ_FD else VringFile(index, False)
            try:
                with pytest.raises(AckError):
                    await fe.request(request, payload, fds=[fd], need_reply=True)
            finally:
                os.close(fd)
            await fe.barrier()  # the same connection answers on
            # The ring runs on with the fds it had.
            assert await echo_roundtrip(port, b"after" * 1000) == b"after" * 1000
            await d.assert_responsive()
        stats = await d.stats()
        assert stats["vhost_user"]["bad_fds"] == {request.name: 1}
        where = "" if request is Request.SET_BACKEND_REQ_FD else f"vring {index}: "
        want = f"{request.name}: rejected: {where}the fd is {what}, not "
        assert len(d.log_lines(want)) == 1, d.log()
        await echo_works(d)


async def test_a_blocking_kick_eventfd_drained_by_the_front_end_never_blocks() -> None:
    with daemon_process() as d:
        async with guest(d) as (fe, driver):
            one, two = await open_ports(driver, "org.test.one", "org.test.two")
            kick = os.eventfd(0)  # blocking, unlike QEMU's
            await fe.set_vring_fd(Request.SET_VRING_KICK, tx_queue(1), kick)
            # The daemon made it non-blocking at receipt: the flag is the open file's, shared
            # with this copy (and with the dup its kick watcher waits on).
            assert os.get_blocking(kick) is False
            async with streaming(two):
                # Kick, then take the count back before the daemon's read(2) can: its epoll
                # woke for nothing. Blocking, that read would freeze every port.
                for _ in range(2000):
                    os.eventfd_write(kick, 1)
                    try:
                        os.eventfd_read(kick)
                    except BlockingIOError:
                        pass  # the daemon read it first
                await d.assert_responsive()
            assert await echo_roundtrip(one, b"k" * 50_000) == b"k" * 50_000
        await d.assert_responsive()
        # SIGTERM finds no syscall to interrupt: a clean exit.
        d.proc.send_signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(d.proc.wait, 20) == 0, d.log()
        assert "InterruptedError" not in d.log() and "Traceback" not in d.log()


async def test_a_blocking_call_eventfd_at_its_maximum_never_blocks() -> None:
    with daemon_process() as d:
        async with guest(d) as (fe, driver):
            one, two = await open_ports(driver, "org.test.one", "org.test.two")
            call = os.eventfd(0)  # blocking, unlike QEMU's
            await fe.set_vring_fd(Request.SET_VRING_CALL, rx_queue(2), call)
            assert os.get_blocking(call) is False
            os.eventfd_write(call, MAX_COUNT)
            # Echoed bytes land in port 2's rx buffers; the interrupt for them cannot be
            # added to a count at its maximum: EAGAIN, counted, never a sleep in write(2).
            await two.write_all(b"echo me" * 100)
            with trio.fail_after(10):
                while not (await _call_failures(d, rx_queue(2))):
                    await trio.sleep(0.01)
            await d.assert_responsive()
            assert await echo_roundtrip(one, b"one" * 10_000) == b"one" * 10_000
            # Nothing was lost: the interrupt was pending all along.
            assert os.eventfd_read(call) == MAX_COUNT
            assert await two.read_exactly(700, timeout=10) == b"echo me" * 100
        lines = d.log_lines(f"vring {rx_queue(2)}: call eventfd write failed")
        assert len(lines) == 1, d.log()
        await echo_works(d)


async def _call_failures(d: DaemonProcess, index: int) -> int:
    stats = await d.stats()
    count: int = stats["vhost_user"]["eventfd_failures"].get(str(index), {}).get("call", 0)
    return count
