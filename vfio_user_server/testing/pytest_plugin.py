"""pytest plugin: a booted Linux guest with your vfio-user devices attached.

Installed with the package (entry point ``vfio_user_guest``)::

    import pytest

    @pytest.mark.vfio_user_devices("gpio-pci-idio-16", modules=["gpio-pci-idio-16"])
    def test_gpiochip(guest):
        assert guest.run("ls /sys/bus/gpio/devices").ok
        assert guest.device.outputs == 0          # the device's Python state

``guest`` is a :class:`~vfio_user_server.testing.harness.DeviceGuest`: ``run()`` a command,
``device``/``devices`` (the Python device objects), ``servers``, ``machine`` (QMP, reboot,
hot-plug) and ``trace_lines`` (with ``trace=True``). The marker takes device names
(``"edu"``, ``"module:Class"``), classes or instances, plus the keyword arguments of
:class:`DeviceGuest` (``modules``, ``module_params``, ``files``, ``shared_memory``,
``memory_mib``, ``cmdline``, ``no_reboot``, ``trace``...). A test can instead override the
``vfio_user_devices`` fixture to return ``(devices, kwargs)``.

Provisioning (QEMU, kernel, busybox) happens once per session; if it fails, every guest test
fails with the reason: a guest test is never skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from ..errors import ProvisioningError
from .harness import DeviceGuest, DeviceLike
from .provision import Provisioned, provision

MARKER = "vfio_user_devices"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(*devices, **options): devices (names, classes or instances) served to the "
        "`guest` fixture's QEMU, and DeviceGuest options",
    )


@pytest.fixture(scope="session")
def vfio_user_provisioned() -> Provisioned:
    """QEMU with vfio-user-pci, the guest kernel and busybox, provisioned once."""
    try:
        return provision()
    except ProvisioningError as exc:
        pytest.fail(f"cannot provision QEMU and the guest: {exc}", pytrace=False)


@pytest.fixture
def vfio_user_devices(request: pytest.FixtureRequest) -> tuple[list[DeviceLike], dict[str, Any]]:
    """The devices and DeviceGuest options of this test (from its marker by default)."""
    marker = request.node.get_closest_marker(MARKER)
    if marker is None:
        return ["sample"], {}
    return list(marker.args), dict(marker.kwargs)


@pytest.fixture
def guest(
    vfio_user_provisioned: Provisioned,
    vfio_user_devices: tuple[list[DeviceLike], dict[str, Any]],
) -> Iterator[DeviceGuest]:
    """Servers for the test's devices and a booted guest attached to them."""
    devices, kwargs = vfio_user_devices
    harness = DeviceGuest(devices, prov=vfio_user_provisioned, **kwargs)
    harness.start()
    try:
        yield harness
    finally:
        harness.close()
