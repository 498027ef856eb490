"""Small pieces of durable checkpoint I/O: checksums (crc32 or any hashlib algorithm), the
manifest's digest, and a file object over a raw descriptor. The reads, writes and directory syncs
that tests slow down or break stay in :mod:`tolaria.state.checkpoints`, where they are patched."""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from typing import Any

__all__ = ["FdFile", "checksum_algorithms", "manifest_digest", "new_hasher"]


class _Crc32:
    """``zlib.crc32`` behind the hashlib interface (it releases the GIL on large buffers, as hashlib does)."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: Any) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


def checksum_algorithms() -> list[str]:
    """Names accepted for ``checksum``: ``"crc32"`` (zlib) and every hashlib algorithm available here."""
    return ["crc32", *sorted(hashlib.algorithms_available)]


def new_hasher(algorithm: str) -> Any:
    return _Crc32() if algorithm == "crc32" else hashlib.new(algorithm)


def manifest_digest(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(canonical).hexdigest()


class FdFile:
    """``write`` on a raw descriptor, for :func:`tolaria.state.checkpoints._write_all`."""

    def __init__(self, fd: int):
        self.fd = fd

    def write(self, data: memoryview) -> int:
        return os.write(self.fd, data)
