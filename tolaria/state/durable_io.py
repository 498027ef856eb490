"""Small pieces of durable checkpoint I/O: checksums (crc32 or any hashlib algorithm), the
manifest's digest, and a file object over a raw descriptor. The reads, writes and directory syncs
that tests slow down or break stay in :mod:`tolaria.state.checkpoints`, where they are patched."""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["FdFile", "check_store_options", "checksum_algorithms", "manifest_digest", "new_hasher", "read_manifest"]


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


def check_store_options(keep_last: Any, checksum: Any) -> None:
    """A checkpoint store's ``keep_last`` (an integer >= 1) and ``checksum`` (a known algorithm)."""
    if not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 1:
        raise ValueError(f"keep_last must be an integer >= 1, got {keep_last!r}")
    if checksum not in checksum_algorithms():
        raise ValueError(
            f"unknown checksum algorithm {checksum!r}; use 'sha256', 'blake2b', 'crc32' or another of "
            f"{checksum_algorithms()}"
        )


def manifest_digest(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(canonical).hexdigest()


class FdFile:
    """``write`` on a raw descriptor, for :func:`tolaria.state.checkpoints._write_all`."""

    def __init__(self, fd: int):
        self.fd = fd

    def write(self, data: memoryview) -> int:
        return os.write(self.fd, data)


def read_manifest(path: Path, expected_format: str, entry_from_json: Callable[[Any], Any]) -> tuple[list[Any], int]:
    """The entries (by sequence) and the sequence counter of a manifest file; ([], 0) if it is absent.

    Raises ``ValueError`` (or ``KeyError``/``TypeError``/``OSError``) for a manifest that is not of
    ``expected_format``, whose digest does not match its content, or whose counter is behind its
    entries: the callers turn it into a ``CheckpointError`` naming the file."""
    if not path.exists():
        return [], 0
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or data.get("format") != expected_format:
        found = data.get("format") if isinstance(data, dict) else data
        raise ValueError(f"format is {found!r}, expected {expected_format!r}")
    body = {key: value for key, value in data.items() if key != "digest"}
    if data.get("digest") != manifest_digest(body):
        raise ValueError("its digest does not match its content")
    entries = sorted((entry_from_json(e) for e in data["checkpoints"]), key=lambda e: e.sequence)
    sequence = data["sequence"]
    if not isinstance(sequence, int) or any(e.sequence > sequence for e in entries):
        raise ValueError(f"sequence {sequence!r} is behind its entries")
    return entries, sequence
