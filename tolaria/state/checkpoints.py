"""The durable tier: checksummed checkpoint files and the manifest that commits them.

Layout of a root folder::

    manifest.json                       the committed checkpoints (the write-ahead record)
    ckpt-000000001200-00000007.pt       one file per checkpoint: step, then commit sequence
    .tmp-...                            files being written (removed at the next start if a crash left them)
    .lock                               held by the StateManager that owns the folder

Committing a checkpoint, in order: the file is written to ``.tmp-<name>`` while its checksum is
computed (streamed, on a helper thread), fsynced, renamed to ``<name>`` and the folder fsynced;
then a new manifest listing it is written the same way (temporary file, fsync, rename, folder
fsync). Only then are checkpoints beyond ``keep_last`` deleted (on a helper thread: deleting a
large file takes a while and the commit need not wait for it). A crash at any instant therefore
leaves the manifest listing only whole files: files it does not list are leftovers, removed (and
reported) when the folder is next opened.

Reading: a checkpoint is used only after its size and checksum match the manifest, and it is loaded
with ``torch.load(..., weights_only=True)``, which refuses any pickle that needs code to run.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import stat
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.serialization import config as serialization_config

from tolaria.state.durable_io import (
    FdFile,
    check_store_options,
    checksum_algorithms,
    manifest_digest,
    new_hasher,
    read_manifest,
)
from tolaria.state.errors import CheckpointError, StagingCancelled
from tolaria.state.reporting import report, report_fallback
from tolaria.state.trees import check_loadable
from tolaria.telemetry import TelemetryEmitter, emitter_or_default

__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_FORMAT",
    "CHECKPOINT_FORMAT",
    "TEMP_PREFIX",
    "checksum_algorithms",
    "CancelFlag",
    "CheckpointEntry",
    "CheckpointStore",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "tolaria.manifest/1"
CHECKPOINT_FORMAT = "tolaria.checkpoint/1"
TEMP_PREFIX = ".tmp-"
_CHECKPOINT_NAME = re.compile(r"^ckpt-(\d{12,})-(\d{8,})\.pt$")
_ZIP_MAGIC = b"PK\x03\x04"
_CHUNK_BYTES = 8 << 20
_PARALLEL_HASH_BYTES = 1 << 20  # below this, hashing inline is cheaper than handing it over


class CancelFlag(Protocol):
    def is_set(self) -> bool: ...


def _read_chunk(file: Any, view: memoryview) -> int:
    """Reads into ``view``; the one place checkpoint bytes are read (tests slow it down or stall it)."""
    return file.readinto(view)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(file: Any, view: memoryview) -> None:
    written = 0
    while written < view.nbytes:
        n = file.write(view[written:])
        if not n:
            raise OSError(f"write returned {n!r} after {written} of {view.nbytes} bytes")
        written += n


@dataclass(frozen=True)
class CheckpointEntry:
    """One committed checkpoint as the manifest records it."""

    step: int
    file: str
    nbytes: int
    checksum: str  # "<hashlib algorithm>:<hex digest>" of the whole file
    sequence: int  # commit order: larger is newer
    created_unix: float

    @classmethod
    def from_json(cls, data: Any) -> CheckpointEntry:
        if not isinstance(data, dict):
            raise ValueError(f"entry is a {type(data).__name__}, expected an object")
        expected = {
            "step": int,
            "file": str,
            "nbytes": int,
            "checksum": str,
            "sequence": int,
            "created_unix": (int, float),
        }
        for key, kind in expected.items():
            if not isinstance(data.get(key), kind) or isinstance(data.get(key), bool):
                raise ValueError(f"entry field {key!r} is {data.get(key)!r}")
        if not _CHECKPOINT_NAME.match(data["file"]) or ":" not in data["checksum"]:
            raise ValueError(f"entry names file {data['file']!r} with checksum {data['checksum']!r}")
        return cls(**{key: data[key] for key in expected})


class _HashingWriter:
    """A write-only file object for ``torch.save`` that checksums what it writes, in parallel."""

    def __init__(self, file: Any, hasher: Any, pool: ThreadPoolExecutor):
        self.file = file
        self.hasher = hasher
        self.pool = pool
        self.nbytes = 0
        self.error: BaseException | None = None  # torch.save replaces it with its own error; keep the cause

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        pending: Future[None] | None = None
        if view.nbytes >= _PARALLEL_HASH_BYTES:
            pending = self.pool.submit(self.hasher.update, view)  # hashlib releases the GIL
        else:
            self.hasher.update(view)
        try:
            _write_all(self.file, view)
        except BaseException as exc:
            self.error = self.error or exc
            raise
        finally:
            if pending is not None:
                pending.result()  # the view must not outlive this call
        self.nbytes += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        self.file.flush()


class CheckpointStore:
    """Durable checkpoints in ``root``: atomic writes, a checksummed manifest, verified safe loads.

    ``checksum`` names the per-file checksum: ``"crc32"`` (zlib; the default: about 4 GB/s on one
    core, so it keeps up with the write, and it catches torn, truncated and bit-flipped files) or any
    hashlib algorithm (``"sha256"``, ``"blake2b"``, ...) for a cryptographic digest, at about half
    that speed (the benchmark shows both).

    One writer per folder (the :class:`~tolaria.state.StateManager` holds a lock on it). Opening a
    folder whose manifest is corrupt raises :class:`CheckpointError`: it is the only record of what
    was committed, so it is never overwritten behind the operator's back.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        keep_last: int,
        *,
        checksum: str = "crc32",
        telemetry: TelemetryEmitter | None = None,
    ):
        check_store_options(keep_last, checksum)
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep_last = keep_last
        self.checksum = checksum
        self.telemetry = emitter_or_default(telemetry)
        self.manifest_path = self.root / MANIFEST_NAME
        self._pool: ThreadPoolExecutor | None = None
        self._cleanup: ThreadPoolExecutor | None = None
        self._pending_cleanup: list[Future[None]] = []
        self._pool_lock = threading.Lock()
        self._entries, self._sequence = self._read_manifest()
        self._remove_leftovers()

    # ---- manifest ---------------------------------------------------------------------------

    @property
    def entries(self) -> tuple[CheckpointEntry, ...]:
        """Committed checkpoints, oldest commit first."""
        return self._entries

    def _read_manifest(self) -> tuple[tuple[CheckpointEntry, ...], int]:
        try:
            entries, sequence = read_manifest(self.manifest_path, MANIFEST_FORMAT, CheckpointEntry.from_json)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"manifest {self.manifest_path} is unreadable or corrupt ({type(exc).__name__}: {exc}); "
                "it is the record of committed checkpoints, so nothing was changed: repair or move it away"
            ) from exc
        return tuple(entries), sequence

    def _write_manifest(self, entries: Sequence[CheckpointEntry], sequence: int) -> None:
        body = {"format": MANIFEST_FORMAT, "sequence": sequence, "checkpoints": [asdict(e) for e in entries]}
        text = json.dumps({**body, "digest": manifest_digest(body)}, indent=1, sort_keys=True).encode()
        tmp = self.root / f"{TEMP_PREFIX}{MANIFEST_NAME}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            _write_all(FdFile(fd), memoryview(text))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.manifest_path)
        _fsync_dir(self.root)

    def _remove_leftovers(self) -> None:
        committed = {e.file for e in self._entries}
        leftovers = sorted(
            p.name
            for p in self.root.iterdir()
            if p.name.startswith(TEMP_PREFIX) or (_CHECKPOINT_NAME.match(p.name) and p.name not in committed)
        )
        removed, failed = [], []
        for name in leftovers:
            try:
                (self.root / name).unlink()
                removed.append(name)
            except OSError as exc:
                failed.append(f"{name} ({exc})")
        if removed:
            report(
                self.telemetry,
                "state.leftovers_removed",
                "warning",
                f"removed {len(removed)} uncommitted file(s) left in {self.root} by an interrupted write: {removed}",
                files=removed,
            )
        if failed:
            report(
                self.telemetry,
                "state.leftovers_remaining",
                "error",
                f"could not remove uncommitted file(s) in {self.root}: {failed}",
                files=failed,
            )

    # ---- writing ------------------------------------------------------------------------------

    def _hash_pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tolaria-checksum")
            return self._pool

    def write(self, step: int, payload: dict[str, Any]) -> CheckpointEntry:
        """Writes ``payload`` as the checkpoint of ``step`` and commits it; returns its manifest entry.

        ``payload`` must load with ``weights_only=True`` (checked first, naming any offending path).
        A previous checkpoint of the same step is replaced; commits beyond ``keep_last`` are deleted
        after the new manifest is durable.
        """
        check_loadable(payload, path=f"checkpoint of step {step}")
        sequence = self._sequence + 1
        name = f"ckpt-{step:012d}-{sequence:08d}.pt"
        final, tmp = self.root / name, self.root / f"{TEMP_PREFIX}{name}"
        hasher = new_hasher(self.checksum)
        writer: _HashingWriter | None = None
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            with os.fdopen(fd, "wb", buffering=0) as file:
                writer = _HashingWriter(file, hasher, self._hash_pool())
                # torch.save's own per-record CRC32 would checksum every byte a second time.
                with serialization_config.patch({"save.compute_crc32": False}):
                    torch.save(payload, writer)
                os.fsync(file.fileno())
            os.replace(tmp, final)
            _fsync_dir(self.root)
        except BaseException as exc:
            self._discard(tmp, final, f"write of step {step} failed")
            cause = writer.error if writer is not None and writer.error is not None else exc
            if isinstance(exc, Exception):
                raise CheckpointError(
                    f"writing the checkpoint of step {step} to {final} failed: {type(cause).__name__}: {cause}"
                ) from cause
            raise
        entry = CheckpointEntry(
            step, name, writer.nbytes, f"{self.checksum}:{hasher.hexdigest()}", sequence, time.time()
        )
        replaced = [e for e in self._entries if e.step == step]
        kept = [e for e in self._entries if e.step != step] + [entry]
        dropped = replaced + kept[: -self.keep_last]
        kept = kept[-self.keep_last :]
        try:
            self._write_manifest(kept, sequence)
        except BaseException as exc:
            if self._manifest_on_disk_has(sequence):
                # Renamed into place, but the folder fsync failed: the manifest names the new file,
                # so the file stays; whether the commit survives a power cut is not guaranteed.
                self._entries, self._sequence = tuple(kept), sequence
                if isinstance(exc, Exception):
                    raise CheckpointError(
                        f"the checkpoint of step {step} is in the manifest, but making it durable "
                        f"failed: {type(exc).__name__}: {exc}"
                    ) from exc
                raise
            self._discard(final, None, f"manifest update for step {step} failed")
            if isinstance(exc, Exception):
                raise CheckpointError(
                    f"committing the checkpoint of step {step} (manifest {self.manifest_path}) failed: "
                    f"{type(exc).__name__}: {exc}; the previous checkpoints are unchanged"
                ) from exc
            raise
        self._entries, self._sequence = tuple(kept), sequence
        if dropped:  # deleting a large file takes a while; the commit does not wait for it
            with self._pool_lock:
                if self._cleanup is None:
                    self._cleanup = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tolaria-cleanup")
                self._pending_cleanup = [f for f in self._pending_cleanup if not f.done()]
                self._pending_cleanup.append(self._cleanup.submit(self._remove_dropped, dropped))
        return entry

    def _manifest_on_disk_has(self, sequence: int) -> bool:
        try:
            return json.loads(self.manifest_path.read_text(encoding="utf-8")).get("sequence") == sequence
        except (OSError, ValueError, AttributeError):
            return False

    def _remove_dropped(self, dropped: list[CheckpointEntry]) -> None:
        for old in dropped:
            self._discard(self.root / old.file, None, f"removing the checkpoint of step {old.step} beyond keep_last")

    def wait_for_cleanup(self) -> None:
        """Blocks until checkpoints dropped by earlier commits are deleted."""
        with self._pool_lock:
            pending, self._pending_cleanup = self._pending_cleanup, []
        for future in pending:
            future.result()

    def _discard(self, path: Path, also: Path | None, context: str) -> None:
        for p in (path, also):
            if p is None:
                continue
            try:
                p.unlink(missing_ok=True)
            except OSError as exc:
                report(
                    self.telemetry,
                    "state.cleanup_failed",
                    "error",
                    f"{context}: could not remove {p} ({exc}); it will be removed when the folder is next opened",
                    file=str(p),
                )

    # ---- reading ------------------------------------------------------------------------------

    def _describe(self, entry: CheckpointEntry) -> str:
        return f"checkpoint of step {entry.step} ({self.root / entry.file})"

    def _hash_file(self, path: Path, algorithm: str, cancel: CancelFlag | None) -> tuple[str, int]:
        """(digest, bytes read); reads and hashes in parallel, two chunks in flight."""
        hasher = new_hasher(algorithm)
        pool = self._hash_pool()
        buffers = (bytearray(_CHUNK_BYTES), bytearray(_CHUNK_BYTES))
        pending: Future[None] | None = None
        total, which = 0, 0
        with open(path, "rb", buffering=0) as file:
            while True:
                if cancel is not None and cancel.is_set():
                    if pending is not None:
                        pending.result()
                    raise StagingCancelled(f"reading {path} was cancelled after {total} bytes")
                view = memoryview(buffers[which])
                n = _read_chunk(file, view)
                if pending is not None:
                    pending.result()
                    pending = None
                if not n:
                    break
                total += n
                pending = pool.submit(hasher.update, view[:n])
                which ^= 1
        return f"{algorithm}:{hasher.hexdigest()}", total

    def verify(self, entry: CheckpointEntry, cancel: CancelFlag | None = None) -> None:
        """Raises :class:`CheckpointError` unless the file is whole: regular, the right size, the right checksum."""
        path, what = self.root / entry.file, self._describe(entry)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise CheckpointError(f"{what}: the file is missing") from None
        except OSError as exc:
            raise CheckpointError(f"{what}: cannot stat the file: {exc}") from exc
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{what}: not a regular file (mode {stat.filemode(st.st_mode)})")
        if st.st_size != entry.nbytes:
            kind = "truncated" if st.st_size < entry.nbytes else "longer than committed"
            raise CheckpointError(f"{what}: {kind}: {st.st_size} bytes on disk, the manifest records {entry.nbytes}")
        algorithm = entry.checksum.split(":", 1)[0]
        if algorithm not in checksum_algorithms():
            raise CheckpointError(f"{what}: checksum algorithm {algorithm!r} is not available here")
        try:
            digest, total = self._hash_file(path, algorithm, cancel)
        except OSError as exc:
            raise CheckpointError(f"{what}: reading the file failed: {exc}") from exc
        if total != entry.nbytes:
            raise CheckpointError(
                f"{what}: {total} bytes read, the manifest records {entry.nbytes} (changed while read)"
            )
        if digest != entry.checksum:
            raise CheckpointError(
                f"{what}: checksum mismatch: the file hashes to {digest}, the manifest records {entry.checksum}"
            )

    def load(self, entry: CheckpointEntry, cancel: CancelFlag | None = None) -> dict[str, Any]:
        """Verifies, then loads a checkpoint (tensors on the CPU, memory-mapped from the file)."""
        self.verify(entry, cancel)
        what = self._describe(entry)
        with open(self.root / entry.file, "rb") as file:
            magic = file.read(4)
        if magic != _ZIP_MAGIC:  # the legacy format (a bare pickle) is never written here
            raise CheckpointError(f"{what}: refused: not a torch.save zip archive (starts with {magic!r})")
        try:
            payload = torch.load(self.root / entry.file, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"{what}: refused: its pickle needs code to load, which weights_only=True never runs ({exc})"
            ) from exc
        except Exception as exc:
            raise CheckpointError(f"{what}: unreadable by torch.load: {type(exc).__name__}: {exc}") from exc
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{what}: not a {CHECKPOINT_FORMAT} checkpoint")
        missing = {"step", "model", "optimizer", "extra", "meta"} - set(payload)
        if missing:
            raise CheckpointError(f"{what}: missing entries {sorted(missing)}")
        if payload["step"] != entry.step:
            raise CheckpointError(f"{what}: the file holds step {payload['step']!r}, the manifest step {entry.step}")
        if cancel is not None and cancel.is_set():
            raise StagingCancelled(f"loading {what} was cancelled")
        return payload

    def load_newest(
        self, entries: Sequence[CheckpointEntry] | None = None, *, cancel: CancelFlag | None = None
    ) -> tuple[CheckpointEntry, dict[str, Any]]:
        """The most recently committed checkpoint (of ``entries``, default all) that verifies and loads.

        Each one that does not is reported (log and telemetry) and the previous commit is tried; if
        none is left, :class:`CheckpointError` lists every failure.
        """
        candidates = self._entries if entries is None else tuple(entries)
        if not candidates:
            raise CheckpointError(f"no committed checkpoint in {self.root}")
        failures = []
        for entry in reversed(sorted(candidates, key=lambda e: e.sequence)):
            try:
                return entry, self.load(entry, cancel)
            except CheckpointError as exc:
                failures.append(str(exc))
                report_fallback(self.telemetry, str(exc), entry.step, entry.file)
        raise CheckpointError(f"no committed checkpoint in {self.root} verifies: " + "; ".join(failures))

    def close(self) -> None:
        """Finishes pending deletions and stops the helper threads (neither waits on a read)."""
        self.wait_for_cleanup()
        with self._pool_lock:
            for pool in (self._pool, self._cleanup):
                if pool is not None:
                    pool.shutdown(wait=True)
            self._pool = self._cleanup = None
