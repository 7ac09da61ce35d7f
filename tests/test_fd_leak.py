"""100 connect / negotiate / map / enable IRQs / disconnect cycles leave no fd (or thread)
behind."""

from __future__ import annotations

import os
import threading

from helpers import (
    MMAP_BAR,
    WAIT,
    MmapSample,
    ServerFactory,
    close_all,
    efd,
    fd_target,
    open_fds,
    wait_eventfd,
    wait_until,
)

from vfio_user_server.client import Client
from vfio_user_server.protocol.constants import IrqIndex, IrqSetFlag

CYCLES = 100


def test_fd_leak_over_connection_cycles(make_server: ServerFactory,
                                        mmap_device: MmapSample) -> None:
    srv = make_server(mmap_device, dma_timeout=5.0)
    baseline = open_fds()
    threads = threading.active_count()
    for cycle in range(CYCLES):
        c = Client.connect(srv.path, timeout=WAIT)
        try:
            c.negotiate()
            c.add_memory(0, 0x10000)
            c.add_memory(0x10000, 0x10000)  # another memfd
            c.add_memory(0x100000, 0x1000, fd_backed=False)
            # a second map of the same file (QEMU sends a new fd copy each time)
            same = c.memory[0]
            assert same.fd is not None
            c.dma_map(0x200000, 0x1000, fd=same.fd, offset=0x1000)
            c.get_device_info()
            for index in (0, 2, 7, MMAP_BAR):
                desc = c.get_region_info(index)
                if desc.fd is not None:
                    os.close(desc.fd)
            irq_fds = c.enable_irq(IrqIndex.MSIX, 4)
            irq_fds += c.enable_irq(IrqIndex.INTX, 1)
            irq_fds += c.enable_irq(IrqIndex.ERR, 1)
            resample = efd()
            irq_fds.append(resample)
            c.set_irqs(IrqIndex.INTX, IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_UNMASK, 0, 1,
                       [resample])
            # replace one vector (the old server fd must be closed)
            new = efd()
            irq_fds.append(new)
            c.set_irqs(IrqIndex.MSIX, IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER, 1, 1,
                       [new])
            mmap_device.irqs.trigger(IrqIndex.MSIX, 1)
            assert wait_eventfd(new) == 1
            if cycle % 2:
                c.dma_unmap(0x10000, 0x10000)  # some maps go before the disconnect
            if cycle % 3 == 0:
                c.reset()
        finally:
            c.close()
        close_all(irq_fds)
        srv.wait_for_disconnect(cycle + 1, WAIT)
    wait_until(lambda: open_fds() <= baseline, what="fds back to the baseline")
    leaked = open_fds() - baseline
    assert not leaked, {fd: fd_target(fd) for fd in leaked}
    wait_until(lambda: threading.active_count() <= threads, what="threads back to the baseline")
    assert mmap_device.events == ["connect", "disconnect"] * CYCLES
