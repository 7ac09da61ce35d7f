"""Device state as bytes: the format, its encoder, and its validating decoder.

:meth:`PciDevice.save_state() <vfio_user_server.device.PciDevice.save_state>` gives bytes that
:meth:`~vfio_user_server.device.PciDevice.load_state` takes back, in this process or another
one (a live upgrade, a reload, a migration). The bytes come from elsewhere, so they are
untrusted: :func:`decode` checks everything (syntax, checksum, format and types) before the
device checks what it means, and only then is anything applied. No pickle.

The format (docs/state.md) is canonical JSON (sorted keys, no spaces, UTF-8)::

    {"body": {...}, "format": "pyvfio-user/device-state", "format_version": 1,
     "sha256": "<hex digest of the canonical JSON of body>"}

``body`` holds the device's identity (class, IDs), its ``state_version``, what the framework
owns (``config``, ``msix``, ``irqs``), the DMA map table's metadata (``dma_maps``: iova, size,
prot, file offset and whether the map had an fd; the fds themselves are not in the state, a
live upgrade hands them over separately) and the device's declared fields (``fields``).

Declared field values are *tagged* so that the JSON says what each one is: ``null``, ``true``
/ ``false``, integers and strings stand for themselves, a list for a list (a tuple is saved as
a list), ``{"bytes": "<base64>"}`` for bytes (or a bytearray) and ``{"dict": [[key, value],
...]}`` for a dict with ``int`` or ``str`` keys, in its order. Nothing else is accepted: no
floats, no other objects.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

from .errors import StateError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MAX_DEPTH",
    "MAX_STATE_SIZE",
    "DmaMapInfo",
    "StateValue",
    "decode",
    "decode_value",
    "encode",
    "encode_value",
]

#: The ``format`` string of every device state.
FORMAT = "pyvfio-user/device-state"
#: The framework's format version: bumped whenever the body's layout changes. A state of
#: another version is refused.
FORMAT_VERSION = 1
#: Largest state accepted (bytes).
MAX_STATE_SIZE = 64 << 20
#: Deepest nesting of lists and dicts in a declared field's value.
MAX_DEPTH = 32

#: What a declared field may hold.
StateValue = Union[  # noqa: UP007 - a recursive alias must be a Union for mypy
    None, bool, int, str, bytes, bytearray, list["StateValue"], tuple["StateValue", ...],
    dict[int | str, "StateValue"],
]

_JSON = Any


@dataclass(frozen=True)
class DmaMapInfo:
    """One DMA map as a state records it. ``fd``: the map had an fd (not carried here)."""

    iova: int
    size: int
    prot: int
    offset: int
    fd: bool


# --------------------------------------------------------------------------- declared values

def encode_value(value: object, path: str = "value", depth: int = 0) -> _JSON:
    """The tagged JSON form of ``value``; StateError naming ``path`` for what cannot be saved."""
    if depth > MAX_DEPTH:
        raise StateError(f"{path}: nested deeper than {MAX_DEPTH}")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, (list, tuple)):
        return [encode_value(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        items = []
        for k, v in value.items():
            if isinstance(k, bool) or not isinstance(k, (int, str)):
                raise StateError(f"{path}: dict key {k!r} is not an int or a str")
            items.append([k, encode_value(v, f"{path}[{k!r}]", depth + 1)])
        return {"dict": items}
    raise StateError(f"{path}: a {type(value).__name__} cannot be saved (ints, bools, str, "
                     "bytes, None, and lists and dicts of them can)")


def decode_value(data: _JSON, path: str = "value", depth: int = 0) -> StateValue:
    """The value a tagged JSON form stands for; StateError for anything else."""
    if depth > MAX_DEPTH:
        raise StateError(f"{path}: nested deeper than {MAX_DEPTH}")
    if data is None or isinstance(data, (bool, int, str)):
        return data
    if isinstance(data, list):
        return [decode_value(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(data)]
    if isinstance(data, dict) and len(data) == 1:
        if "bytes" in data:
            return _b64(data["bytes"], path)
        items = data.get("dict")
        if isinstance(items, list):
            out: dict[int | str, StateValue] = {}
            for item in items:
                if not (isinstance(item, list) and len(item) == 2):
                    raise StateError(f"{path}: a dict item is not a [key, value] pair")
                k, v = item
                if isinstance(k, bool) or not isinstance(k, (int, str)):
                    raise StateError(f"{path}: dict key {k!r} is not an int or a str")
                if k in out:
                    raise StateError(f"{path}: dict key {k!r} repeated")
                out[k] = decode_value(v, f"{path}[{k!r}]", depth + 1)
            return out
    raise StateError(f"{path}: not a state value ({type(data).__name__})")


def _b64(text: object, path: str) -> bytes:
    if not isinstance(text, str):
        raise StateError(f"{path}: bytes must be base64 text")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise StateError(f"{path}: bad base64") from None


# ----------------------------------------------------------------------------------- envelope

def _canonical(obj: _JSON) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def encode(body: Mapping[str, _JSON]) -> bytes:
    """The state bytes for ``body`` (already JSON: see :func:`encode_value`)."""
    data = dict(body)
    digest = hashlib.sha256(_canonical(data)).hexdigest()
    out = _canonical({"body": data, "format": FORMAT, "format_version": FORMAT_VERSION,
                      "sha256": digest})
    if len(out) > MAX_STATE_SIZE:
        raise StateError(f"device state of {len(out)} bytes exceeds {MAX_STATE_SIZE}")
    return out


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise StateError(f"JSON object key {key!r} repeated")
        out[key] = value
    return out


def _no_float(text: str) -> Any:
    raise StateError(f"number {text[:20]!r} is not an integer")


def decode(data: bytes) -> dict[str, Any]:
    """Parse and check the envelope of ``data``; return its body (still to be validated).

    StateError for anything that is not a whole, uncorrupted state of this format version.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise StateError(f"a device state is bytes, not {type(data).__name__}")
    if len(data) > MAX_STATE_SIZE:
        raise StateError(f"device state of {len(data)} bytes exceeds {MAX_STATE_SIZE}")
    try:
        doc = json.loads(bytes(data).decode("utf-8"), object_pairs_hook=_no_duplicates,
                         parse_float=_no_float, parse_constant=_no_float)
    except StateError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise StateError(f"not a device state (truncated or corrupt): {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise StateError(f"not a device state (no format {FORMAT!r})")
    version = doc.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise StateError(f"device state format version {version!r}; this code reads "
                         f"version {FORMAT_VERSION}")
    if set(doc) != {"body", "format", "format_version", "sha256"}:
        raise StateError(f"device state has unexpected keys {sorted(set(doc))}")
    body = doc["body"]
    if not isinstance(body, dict):
        raise StateError("device state body is not an object")
    if hashlib.sha256(_canonical(body)).hexdigest() != doc["sha256"]:
        raise StateError("device state checksum mismatch (corrupt)")
    return body


# ----------------------------------------------------------------------- typed body accessors

class Reader:
    """Typed access to a decoded JSON object; every miss is a StateError naming the path."""

    def __init__(self, obj: object, path: str) -> None:
        if not isinstance(obj, dict):
            raise StateError(f"{path}: not an object")
        self.obj: dict[str, Any] = obj
        self.path = path

    def keys(self, *names: str) -> Reader:
        """Require exactly these keys."""
        if set(self.obj) != set(names):
            raise StateError(f"{self.path}: keys {sorted(self.obj)}, expected {sorted(names)}")
        return self

    def _get(self, name: str) -> Any:
        if name not in self.obj:
            raise StateError(f"{self.path}.{name}: missing")
        return self.obj[name]

    def integer(self, name: str, lo: int = 0, hi: int = (1 << 64) - 1) -> int:
        value = self._get(name)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise StateError(f"{self.path}.{name}: {value!r} is not an integer in "
                             f"[{lo:#x}, {hi:#x}]")
        return value

    def flag(self, name: str) -> bool:
        value = self._get(name)
        if not isinstance(value, bool):
            raise StateError(f"{self.path}.{name}: {value!r} is not a bool")
        return value

    def text(self, name: str) -> str:
        value = self._get(name)
        if not isinstance(value, str):
            raise StateError(f"{self.path}.{name}: {value!r} is not a string")
        return value

    def blob(self, name: str) -> bytes:
        return _b64(self._get(name), f"{self.path}.{name}")

    def flags(self, name: str) -> list[bool]:
        value = self._get(name)
        if not isinstance(value, list) or not all(isinstance(v, bool) for v in value):
            raise StateError(f"{self.path}.{name}: not a list of bools")
        return value

    def items(self, name: str) -> list[Any]:
        value = self._get(name)
        if not isinstance(value, list):
            raise StateError(f"{self.path}.{name}: not a list")
        return value

    def sub(self, name: str) -> Reader:
        return Reader(self._get(name), f"{self.path}.{name}")

    def optional(self, name: str) -> Reader | None:
        value = self._get(name)
        return None if value is None else Reader(value, f"{self.path}.{name}")
