"""A guest for virtqueue.pump: memfd guest memory, DriverQueue drivers kicking and waiting on
real eventfds, and the pure-Python device path the pump must match (SplitQueue pop + socket).

`python -m vhostser.testing.pump_guest` measures the pump against that Python path: 1-byte
round trips and GiB/s each way through a socketpair, and the CPU seconds per GiB.
"""

from __future__ import annotations

import os
import random
import select
import socket
import threading
import time
from collections.abc import Callable

from vhostser.testing.frontend import sealed_memfd
from virtqueue import Chain, DriverQueue, MappedMemory, Region, SplitQueue, ring_layout
from virtqueue.pump import Pump

RINGS = 0x0  # region 0: rings and indirect tables
RINGS_SIZE = 0x10_0000
DATA = 0x100_0000  # region 1: the buffers
DATA_SIZE = 0x100_0000
_RING_SLOT = 0x4_0000  # per queue: its rings, then one indirect table per area
_IND_SLOT = 0x400
TIMEOUT = 20.0


class Guest:
    """Guest memory made of two memfd regions; queues carve it up."""

    def __init__(self) -> None:
        self.mem = MappedMemory()
        for gpa, size in ((RINGS, RINGS_SIZE), (DATA, DATA_SIZE)):
            fd = sealed_memfd("pump-guest", size)
            try:
                self.mem.add(Region(gpa, size, 0x7F00_0000_0000 + gpa, 0), fd)
            finally:
                os.close(fd)
        self._queues = 0
        self._data_used = 0

    def queue(
        self, size: int = 256, *, event_idx: bool = False, areas: int = 32,
        area_size: int = 0x4000, indirect: bool = True,
    ) -> GuestQueue:
        """A new queue with `areas` buffers of `area_size` bytes for its chains."""
        ring = RINGS + _RING_SLOT * self._queues
        data = DATA + self._data_used
        self._queues += 1
        self._data_used += areas * area_size
        assert ring + _RING_SLOT <= RINGS + RINGS_SIZE and self._data_used <= DATA_SIZE
        return GuestQueue(self.mem, ring, size, event_idx, areas, data, area_size, indirect)

    def close(self) -> None:
        self.mem.close()


class GuestQueue:
    """One queue: the driver (the guest), the device's SplitQueue, its kick and call fds."""

    def __init__(
        self, mem: MappedMemory, ring: int, size: int, event_idx: bool, areas: int, data: int,
        area_size: int, indirect: bool,
    ) -> None:
        d, a, u, total = ring_layout(size)
        assert total + areas * _IND_SLOT <= _RING_SLOT
        self.mem = mem
        self.addrs = (ring + d, ring + a, ring + u)
        self.drv = DriverQueue(mem, size, ring + d, ring + a, ring + u, event_idx=event_idx)
        self.dev = SplitQueue(mem, size, ring + d, ring + a, ring + u, event_idx=event_idx,
                              indirect=indirect)
        if event_idx:
            self.dev.enable_notifications()
        self.kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.area_size = area_size
        self._ind = ring + (total + 15) // 16 * 16
        self._data = data
        self._free = list(range(areas))
        self._in_flight: dict[int, tuple[int, list[tuple[int, int]]]] = {}
        self.calls = 0

    def can_add(self, nsegs: int, indirect: bool) -> bool:
        return bool(self._free) and self.drv.free_descriptors >= (1 if indirect else nsegs)

    def add(self, lens: list[int], *, write: bool, indirect: bool = False,
            payload: bytes = b"") -> int:
        """A chain of buffers of `lens` bytes in one free area (readable ones holding
        `payload`, device-writable ones if `write`), made available; its head."""
        area = self._free.pop()
        base = self._data + area * self.area_size
        assert sum(lens) <= self.area_size and len(lens) * 16 <= _IND_SLOT
        bufs, at = [], base
        for n in lens:
            bufs.append((at, n))
            at += n
        if payload:
            self.mem.view(base, len(payload))[:] = payload
        table = self._ind + area * _IND_SLOT if indirect else None
        head = self.drv.add([] if write else bufs, bufs if write else [], indirect_table=table)
        self._in_flight[head] = (area, bufs)
        return head

    def kick_if_wanted(self) -> None:
        if self.drv.should_kick():
            os.eventfd_write(self.kick, 1)

    def reap(self) -> list[tuple[int, int, bytes]]:
        """(head, written, the bytes written) of every chain the device returned."""
        out = []
        while (used := self.drv.get_used()) is not None:
            head, written = used
            area, bufs = self._in_flight.pop(head)
            self._free.append(area)
            data, left = bytearray(), written
            for addr, n in bufs:
                take = min(n, left)
                data += self.mem.view(addr, take)
                left -= take
            out.append((head, written, bytes(data)))
        return out

    def wait_used(self, timeout: float = TIMEOUT) -> None:
        """Sleep until the device returns a chain, as a driver does: interrupts on, check,
        then the call eventfd. A missing call makes this time out."""
        if self.drv.enable_interrupts():
            return
        r, _, _ = select.select([self.call], [], [], timeout)
        if not r:
            raise TimeoutError("no call from the device")
        self.calls += os.eventfd_read(self.call)

    def close(self) -> None:
        os.close(self.kick)
        os.close(self.call)


Layout = Callable[[], tuple[list[int], bool]]  # the next chain's buffer lengths, indirect


def random_layout(rng: random.Random, max_segs: int = 6, max_len: int = 2048) -> Layout:
    def layout() -> tuple[list[int], bool]:
        return [rng.randint(1, max_len) for _ in range(rng.randint(1, max_segs))], \
            rng.random() < 0.3
    return layout


def guest_send(q: GuestQueue, data: bytes, layout: Layout,
               between: Callable[[], None] = lambda: None) -> None:
    """The guest writes `data` in chains shaped by `layout` and waits until all are used;
    `between` runs after each batch of chains (a test detaching the pump there)."""
    pos = 0
    while pos < len(data) or q.drv.free_descriptors < q.drv.size:
        added = False
        while pos < len(data):
            lens, ind = layout()
            if not q.can_add(len(lens), ind):
                break
            chunk = data[pos:pos + sum(lens)]
            lens = _fit(lens, len(chunk))
            q.add(lens, write=False, indirect=ind, payload=chunk)
            pos += len(chunk)
            added = True
        if added:
            q.kick_if_wanted()
            between()
        if not q.reap() and not added:
            q.wait_used()


def guest_receive(q: GuestQueue, n: int, layout: Layout,
                  between: Callable[[], None] = lambda: None) -> bytes:
    """The guest posts rx chains shaped by `layout` until `n` bytes came."""
    got = bytearray()
    while len(got) < n:
        added = False
        while True:
            lens, ind = layout()
            if not q.can_add(len(lens), ind):
                break
            q.add(lens, write=True, indirect=ind)
            added = True
        if added:
            q.kick_if_wanted()
            between()
        done = q.reap()
        for _, _, data in done:
            got += data
        if not done and not added:
            q.wait_used()
    return bytes(got)


def _fit(lens: list[int], total: int) -> list[int]:
    """`lens` cut down to `total` bytes (the last chain of a transfer)."""
    out = []
    for n in lens:
        if total <= 0:
            break
        out.append(min(n, total))
        total -= n
    return out


# ---------------------------------------------------------------- the pure-Python device path

def _serve(q: SplitQueue, call: int, one: Callable[[Chain], bool]) -> int:
    """Pop chains of `q` for `one` until the ring is empty or `one` says stop (having given
    the chain back); then the call the driver asked for. Chains served."""
    n = 0
    while True:
        chain = q.pop()
        if chain is None:
            if q.enable_notifications():
                continue
            break
        if not one(chain):
            break
        n += 1
    if q.should_notify():
        os.eventfd_write(call, 1)
    return n


def py_g2h(q: SplitQueue, sock: socket.socket, call: int, offset: int = 0) -> int:
    """Serve tx `q` to blocking `sock` until the ring is empty; the first chain skips `offset`
    bytes (a pump lane's LaneState.offset). Chains served."""
    skip = [offset]

    def send(chain: Chain) -> bool:
        sock.sendall(chain.read()[skip.pop() if skip else 0:])
        q.push(chain.head, 0)
        return True

    return _serve(q, call, send)


def py_h2g(q: SplitQueue, sock: socket.socket, call: int) -> int:
    """Fill rx chains of `q` from non-blocking `sock` while both have some: peek, publish,
    consume, as the pump does. Chains served."""

    def fill(chain: Chain) -> bool:
        if not chain.writable_len:
            q.push(chain.head, 0)  # as the daemon does: nothing fits, completed empty
            return True
        buf = bytearray(chain.writable_len)
        try:
            got = sock.recv_into(buf, len(buf), socket.MSG_PEEK)
        except BlockingIOError:
            got = 0
        if not got:
            q.give_back(chain)
            return False
        chain.write(memoryview(buf)[:got])
        q.push(chain.head, got)
        sock.recv(got)
        return True

    return _serve(q, call, fill)


# ---------------------------------------------------------------- measurement

class _PyDevice(threading.Thread):
    """The Python path in a thread of its own, woken by kicks and the socket as trio would."""

    def __init__(self, g2h: GuestQueue, h2g: GuestQueue, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.g2h, self.h2g, self.sock = g2h, h2g, sock
        self.stop_r, self.stop_w = os.pipe()

    cpu = 0.0

    def run(self) -> None:
        sock = self.sock
        while True:
            self.cpu = time.thread_time()
            r, _, _ = select.select(
                [self.g2h.kick, self.h2g.kick, sock.fileno(), self.stop_r], [], [])
            if self.stop_r in r:
                return
            for fd in (self.g2h.kick, self.h2g.kick):
                if fd in r:
                    os.eventfd_read(fd)
            sock.setblocking(True)
            py_g2h(self.g2h.dev, sock, self.g2h.call)
            sock.setblocking(False)
            if py_h2g(self.h2g.dev, sock, self.h2g.call) == 0 and sock.fileno() in r:
                # Readable, but no rx buffer: wait for a kick, not the socket.
                select.select([self.h2g.kick, self.stop_r], [], [], 0.001)

    def stop(self) -> None:
        os.write(self.stop_w, b"x")
        self.join()


def _pump_cpu() -> float:
    """CPU seconds of the pump threads of this process (named vq-pump by pump.c)."""
    total = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() != "vq-pump":
                    continue
            # Nanoseconds on a CPU; stat's clock ticks are too coarse for a short run.
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:
            continue  # a thread that ended meanwhile
    return total / 1e9


def _measure(engine: str, rounds: int, nbytes: int) -> dict[str, float]:
    guest = Guest()
    g2h = guest.queue(event_idx=True, areas=64, area_size=0x8000)
    h2g = guest.queue(event_idx=True, areas=200, area_size=0x1000)
    dev_sock, peer = socket.socketpair()
    pump: Pump | None = None
    py: _PyDevice | None = None
    if engine == "pump":
        pump = Pump()
        pump.attach_g2h(0, g2h.dev, g2h.kick, g2h.call, dev_sock.fileno())
        pump.attach_h2g(1, h2g.dev, h2g.kick, h2g.call, dev_sock.fileno())
    else:
        py = _PyDevice(g2h, h2g, dev_sock)
        py.start()
    def cpu() -> float:
        return _pump_cpu() if py is None else py.cpu

    try:
        # Round trip: guest writes 1 byte, the peer echoes it, the guest reads it.
        for _ in range(4):
            h2g.add([4096], write=True)
        h2g.kick_if_wanted()
        t0 = time.perf_counter()
        for _ in range(rounds):
            g2h.add([1], write=False, payload=b"x")
            g2h.kick_if_wanted()
            peer.sendall(peer.recv(1))
            got = h2g.reap()
            while not got:
                h2g.wait_used()
                got = h2g.reap()
            for _ in got:
                h2g.add([4096], write=True)
            h2g.kick_if_wanted()
            g2h.reap()
        rtt = (time.perf_counter() - t0) / rounds
        data = os.urandom(1 << 20) * (nbytes >> 20)
        out = bytearray()

        def drain() -> None:
            while len(out) < len(data):
                out.extend(peer.recv(1 << 20))

        reader = threading.Thread(target=drain)
        c0, t0 = cpu(), time.perf_counter()
        reader.start()
        # Shaped as Linux's virtio_console makes them: writes of up to 32 KiB in pages,
        # receive buffers of one page.
        guest_send(g2h, data, lambda: ([0x1000] * 8, False))
        reader.join()
        g2h_s, g2h_cpu = time.perf_counter() - t0, cpu() - c0
        assert out == data
        writer = threading.Thread(target=peer.sendall, args=(data,))
        c0, t0 = cpu(), time.perf_counter()
        writer.start()
        back = guest_receive(h2g, len(data), lambda: ([0x1000], False))
        writer.join()
        h2g_s, h2g_cpu = time.perf_counter() - t0, cpu() - c0
        assert back == data
        gib = len(data) / (1 << 30)
        return {"rtt_us": rtt * 1e6, "g2h_gib_s": gib / g2h_s, "h2g_gib_s": gib / h2g_s,
                # The device's thread only (the guest and the peer are Python here).
                "g2h_cpu_s_per_gib": g2h_cpu / gib, "h2g_cpu_s_per_gib": h2g_cpu / gib}
    finally:
        if pump is not None:
            pump.close()
        if py is not None:
            py.stop()
        dev_sock.close()
        peer.close()
        g2h.close()
        h2g.close()
        guest.close()


def main() -> None:
    results = {e: _measure(e, 2000, 64 << 20) for e in ("python", "pump")}
    print(f"{'':22}{'python':>12}{'pump':>12}")
    for key in results["pump"]:
        py, pu = results["python"][key], results["pump"][key]
        print(f"{key:22}{py:12.3f}{pu:12.3f}")


if __name__ == "__main__":
    main()
