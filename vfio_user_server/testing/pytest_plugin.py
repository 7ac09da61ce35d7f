"""pytest plugin: a running Linux guest with your vfio-user devices attached.

Installed with the package (entry point ``vfio_user_guest``)::

    import pytest

    @pytest.mark.vfio_user_devices("gpio-pci-idio-16", modules=["gpio-pci-idio-16"])
    def test_gpiochip(guest):
        assert guest.run("ls /sys/bus/gpio/devices").ok
        assert guest.device.outputs == 0          # the device's Python state

    @pytest.mark.vfio_user_devices(devices=[MyDevice])   # a class: use devices=[...]
    def test_mine(guest): ...

``guest`` is a :class:`~vfio_user_server.testing.harness.Guest`: ``run()`` a command,
``device``/``devices`` (the Python device objects), ``servers``, ``machine`` (the
:class:`~vfio_user_server.testing.guest.QemuMachine`: QMP, reboot, hot-plug) and
``trace_lines`` (with ``trace=True``). The marker takes device names (``"edu"``,
``"module:Class"``), classes or instances, positionally or as ``devices=[...]``, plus the
keyword arguments of :class:`~vfio_user_server.testing.harness.Guest` (``modules``,
``module_params``, ``files``, ``shared_memory``, ``memory_mib``, ``cmdline``, ``no_reboot``,
``trace``, ``cold_boot``...). A test can instead override the ``vfio_user_devices`` fixture to
return ``(devices, kwargs)``.

**A device class alone** (``@pytest.mark.vfio_user_devices(MyDevice)``) cannot work: pytest
takes a lone class (or function) given to a marker as the object being decorated, marks the
class and hands it the test function, which fails at collection with a ``TypeError``. Write
``devices=[MyDevice]`` (or add any keyword); the plugin recognises the trap and says so.

Each guest is restored from a template snapshot (booted once per setup and cached in the
provisioning cache folder) and gets its devices by hot-plug, about a second per test under
TCG; ``cold_boot=True`` in the marker, or ``$PYVFIO_COLD_BOOT=1`` for the whole run, boots
QEMU with the devices present at power-on instead (option ROMs, firmware enumeration, reboot
tests). With pytest-xdist (``-n 2``) each worker restores its own guests from the shared
snapshot; the first worker to need a template makes it and the others wait for it.

Provisioning (QEMU, kernel, busybox) happens once per session; if it fails, every guest test
fails with the reason: a guest test is never skipped.
"""

from __future__ import annotations

import inspect
from collections.abc import Generator, Iterator
from typing import Any

import pytest

from ..endpoint import VfioDevice
from ..errors import ProvisioningError
from . import standby
from .harness import DeviceLike, Guest
from .provision import Provisioned, provision

MARKER = "vfio_user_devices"

LONE_CLASS_HINT = (
    "@pytest.mark.{marker}({name}) with a device class as the only argument: pytest takes a "
    "lone class as the object being decorated (it marked {name} and called {name}(test)). "
    "Write @pytest.mark.{marker}(devices=[{name}]), or name it as a string "
    '("module:{name}").'
)


def pytest_configure(config: pytest.Config) -> None:
    standby.POOL.enable()  # a guest restored while the current test runs (see .standby)
    config.addinivalue_line(
        "markers",
        f"{MARKER}(*devices, devices=[...], cold_boot=False, **options): devices (names, "
        "classes or instances) served to the `guest` fixture's QEMU, and Guest options",
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    standby.POOL.close()


def _all_subclasses(cls: type) -> Iterator[type]:
    sub: type
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


def lone_class_markers() -> list[type]:
    """Device classes that carry our marker themselves: the trace of the lone-class trap."""
    found = []
    for cls in _all_subclasses(VfioDevice):
        marks = cls.__dict__.get("pytestmark", [])
        if any(getattr(m, "name", None) == MARKER for m in marks):
            found.append(cls)
    return found


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, None]:
    """Explain the lone-class trap when a module fails to import because of it."""
    outcome = yield
    report: pytest.CollectReport = outcome.get_result()
    if not report.failed or "TypeError" not in str(report.longrepr):
        return
    culprits = lone_class_markers()
    if not culprits:
        return
    hints = "\n".join(LONE_CLASS_HINT.format(marker=MARKER, name=c.__name__) for c in culprits)
    report.longrepr = f"{hints}\n\n{report.longrepr}"


@pytest.fixture(scope="session")
def vfio_user_provisioned() -> Provisioned:
    """QEMU with vfio-user-pci, the guest kernel and busybox, provisioned once."""
    try:
        return provision()
    except ProvisioningError as exc:
        pytest.fail(f"cannot provision QEMU and the guest: {exc}", pytrace=False)


@pytest.fixture
def vfio_user_devices(request: pytest.FixtureRequest) -> tuple[list[DeviceLike], dict[str, Any]]:
    """The devices and Guest options of this test (from its marker by default)."""
    marker = request.node.get_closest_marker(MARKER)
    if marker is None:
        return ["sample"], {}
    kwargs = dict(marker.kwargs)
    extra = kwargs.pop("devices", [])
    if isinstance(extra, (str, VfioDevice)) or inspect.isclass(extra):
        extra = [extra]
    devices = [*marker.args, *extra]
    if not devices:
        pytest.fail(f"@pytest.mark.{MARKER} names no device", pytrace=False)
    return devices, kwargs


@pytest.fixture
def guest(
    vfio_user_provisioned: Provisioned,
    vfio_user_devices: tuple[list[DeviceLike], dict[str, Any]],
) -> Iterator[Guest]:
    """Servers for the test's devices and a running guest attached to them."""
    devices, kwargs = vfio_user_devices
    harness = Guest(devices, prov=vfio_user_provisioned, **kwargs)
    harness.start()
    try:
        yield harness
    finally:
        harness.close()
