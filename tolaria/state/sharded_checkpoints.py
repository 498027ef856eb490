"""Durable checkpoints of sharded runs (FSDP2, ZeRO): every rank writes its shard through PyTorch's
distributed checkpointing (``torch.distributed.checkpoint``, DCP), with the replicated store's
guarantees kept (:mod:`tolaria.state.checkpoints`).

Layout of a root folder (on a file system every rank sees)::

    manifest.json                      the committed checkpoints, each with every file's size and checksum
    ckpt-000000001200-00000007/        one DCP folder per checkpoint: step, then commit sequence
        .metadata  __0_0.distcp ...    DCP's files (written by every rank)
        extra.pt                       the ``extra`` state (or extra-<rank>.pt when the ranks' differ)
    .tmp-ckpt-...                      a checkpoint being written (removed when the folder is next used)

Committing, in order (:meth:`ShardedCheckpointStore.write`, called by every rank): rank 0 creates
``.tmp-<name>``; every rank writes its shard there with ``dcp.save`` (files fsynced) and its
``extra``; the files are checksummed (split over the ranks); rank 0 fsyncs the folder, renames it to
``<name>``, fsyncs the root and writes the new manifest the same way (temporary file, fsync, rename,
fsync). Only then are checkpoints beyond ``keep_last`` deleted. A crash at any instant leaves the
manifest listing only whole checkpoints.

Reading (:meth:`ShardedCheckpointStore.load_newest`, every rank): the newest committed checkpoint
whose files all match the manifest's sizes and checksums (verified in parallel, split over the ranks)
is loaded; one that does not is reported and the previous one tried. What is trusted: the manifest,
as the record of what was committed (JSON, its own digest). Nothing in a checkpoint folder runs code:
DCP's ``.metadata`` pickle is unpickled with an allowlist and may only point at verified files,
non-tensor values and ``extra`` load with ``weights_only=True``, tensors with DCP's own
``weights_only=True`` reader (:mod:`tolaria.state.dcp_safety`). The state is read into fresh tensors
(transiently twice the rank's shard of model and optimizer state) and copied into the model and
optimizer only once every rank has it (``set_state_dict``), so a failed read leaves the parameters
untouched. One thing DCP does first: an optimizer with no state yet gets its state made by
``get_state_dict`` (one step with zero gradients and the learning rate set to 0, which moves no
parameter), so that there are tensors to read into.

DCP reshards on load: a checkpoint written on 4 ranks resumes on 2 (or 8), as long as the ranks'
``extra`` states were identical (the trainer's are, except ExcessMTL's shard-local state, which
resumes on the same world size only; anything else raises).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: caught by name
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from tolaria.state.checkpoints import TEMP_PREFIX, _fsync_dir, _read_chunk, _write_all
from tolaria.state.dcp_safety import VerifiedMetadataReader, WeightsOnlyLoadPlanner
from tolaria.state.durable_io import (
    FdFile,
    check_store_options,
    checksum_algorithms,
    manifest_digest,
    new_hasher,
    read_manifest,
)
from tolaria.state.errors import CheckpointError, StateError, StateMismatchError
from tolaria.state.reporting import report, report_fallback
from tolaria.state.trees import check_loadable, map_tensors
from tolaria.telemetry import TelemetryEmitter, emitter_or_default

__all__ = ["SHARDED_MANIFEST_FORMAT", "ShardedCheckpointEntry", "ShardedCheckpointStore", "ShardedRestored"]

SHARDED_MANIFEST_FORMAT = "tolaria.sharded-manifest/1"
_MANIFEST_NAME = "manifest.json"
_DIR_NAME = re.compile(r"^ckpt-(\d{12,})-(\d{8,})$")
_FILE_NAME = re.compile(r"^(?!\.\.?$)[A-Za-z0-9_.-]+$")  # a plain name inside the checkpoint folder
_EXTRA = "extra.pt"
_CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class ShardedCheckpointEntry:
    """One committed sharded checkpoint as the manifest records it."""

    step: int
    dir: str
    sequence: int
    created_unix: float
    world_size: int  # ranks that wrote it
    extra_per_rank: bool  # the ranks' extra states differed: extra-<rank>.pt, same world size only
    files: dict[str, list[Any]]  # name -> [bytes, "<algorithm>:<hex digest>"]

    @classmethod
    def from_json(cls, data: Any) -> ShardedCheckpointEntry:
        if not isinstance(data, dict):
            raise ValueError(f"entry is a {type(data).__name__}, expected an object")
        kinds = {"step": int, "dir": str, "sequence": int, "created_unix": (int, float), "world_size": int}
        for key, kind in {**kinds, "extra_per_rank": bool, "files": dict}.items():
            value = data.get(key)
            if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
                raise ValueError(f"entry field {key!r} is {value!r}")
        if not _DIR_NAME.match(data["dir"]):
            raise ValueError(f"entry names folder {data['dir']!r}")
        for name, record in data["files"].items():
            well_formed = isinstance(record, list) and len(record) == 2 and isinstance(record[0], int)
            if not _FILE_NAME.match(name) or not well_formed or not isinstance(record[1], str) or ":" not in record[1]:
                raise ValueError(f"entry records file {name!r} as {record!r}")
        return cls(**{key: data[key] for key in (*kinds, "extra_per_rank", "files")})


@dataclass(frozen=True)
class ShardedRestored:
    """What :meth:`ShardedCheckpointStore.load_newest` restored."""

    step: int
    extra: Any
    dir: str
    sequence: int


def _hash_file(path: Path, algorithm: str) -> tuple[str, int]:
    hasher, total, buffer = new_hasher(algorithm), 0, bytearray(_CHUNK_BYTES)
    with open(path, "rb", buffering=0) as file:
        while n := _read_chunk(file, memoryview(buffer)):
            hasher.update(memoryview(buffer)[:n])
            total += n
    return f"{algorithm}:{hasher.hexdigest()}", total


def _write_durably(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        _write_all(FdFile(fd), memoryview(data))
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardedCheckpointStore:
    """Checkpoints of sharded models and optimizers in ``root``, written and read by every rank.

    ``write`` and ``load_newest`` are collective over ``group`` (default: the whole job; in a single
    process without a process group they run alone): every rank calls them with the same step, and
    a failure on any rank raises on every rank. ``checksum`` is ``"crc32"`` (default) or a hashlib
    algorithm, as for :class:`~tolaria.state.CheckpointStore`. Rank 0 of ``group`` owns the manifest;
    one run writes a folder at a time.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        keep_last: int,
        *,
        checksum: str = "crc32",
        telemetry: TelemetryEmitter | None = None,
        group: dist.ProcessGroup | None = None,
    ):
        check_store_options(keep_last, checksum)
        self.root = Path(root)
        self.keep_last = keep_last
        self.checksum = checksum
        self.telemetry = emitter_or_default(telemetry)
        self._live = dist.is_available() and dist.is_initialized()
        self.group = group if group is not None or not self._live else dist.group.WORLD
        self.rank = dist.get_rank(self.group) if self._live else 0
        self.world_size = dist.get_world_size(self.group) if self._live else 1
        self._leftovers_checked = False
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)

    # ---- collectives over the group (JSON only: nothing received is unpickled) -------------------

    def _control_device(self) -> torch.device:
        nccl = self._live and "nccl" in str(dist.get_backend(self.group))
        return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def _all_gather_json(self, value: Any) -> list[Any]:
        data = json.dumps(value).encode()
        if not self._live:
            return [json.loads(data)]
        device = self._control_device()
        size = torch.tensor([len(data)], dtype=torch.int64, device=device)
        sizes = [torch.empty_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size, group=self.group)
        lengths = [int(s.item()) for s in sizes]
        wire = torch.zeros(max(lengths), dtype=torch.uint8, device=device)
        wire[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
        gathered = [torch.empty_like(wire) for _ in range(self.world_size)]
        dist.all_gather(gathered, wire, group=self.group)
        return [json.loads(g[:n].cpu().numpy().tobytes()) for g, n in zip(gathered, lengths)]

    def _agree(self, error: BaseException | None, what: str) -> None:
        """Raises on every rank if ``what`` failed on any (the failing rank re-raises its own error)."""
        outcomes = self._all_gather_json(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        failed = [(r, message) for r, message in enumerate(outcomes) if message is not None]
        if failed:
            rank, message = failed[0]
            raise CheckpointError(f"{what} failed on rank {rank} of {self.world_size}: {message}")

    def _from_main(self, compute: Callable[[], Any], what: str) -> Any:
        """Rank 0's ``compute()`` (JSON) on every rank; its failure raises on every rank."""
        value, error = None, None
        if self.rank == 0:
            try:
                value = compute()
            except Exception as exc:  # shared below, then re-raised on rank 0
                error = exc
        self._agree(error, what)
        return self._all_gather_json(value)[0] if self._live else value

    # ---- the manifest (rank 0) ---------------------------------------------------------------------

    def _read_manifest(self) -> tuple[list[ShardedCheckpointEntry], int]:
        path = self.root / _MANIFEST_NAME
        try:
            entries, sequence = read_manifest(path, SHARDED_MANIFEST_FORMAT, ShardedCheckpointEntry.from_json)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"manifest {path} is unreadable or corrupt ({type(exc).__name__}: {exc}); it is the record of "
                "committed checkpoints, so nothing was changed: repair or move it away"
            ) from exc
        if not self._leftovers_checked:  # files of an interrupted write, once per store
            self._leftovers_checked = True
            committed = {e.dir for e in entries}
            for p in sorted(self.root.iterdir()):
                if p.name.startswith(TEMP_PREFIX) or (_DIR_NAME.match(p.name) and p.name not in committed):
                    self._remove(p, "an uncommitted checkpoint left by an interrupted write")
        return entries, sequence

    def _write_manifest(self, entries: Sequence[ShardedCheckpointEntry], sequence: int) -> None:
        body = {"format": SHARDED_MANIFEST_FORMAT, "sequence": sequence, "checkpoints": [asdict(e) for e in entries]}
        text = json.dumps({**body, "digest": manifest_digest(body)}, indent=1, sort_keys=True).encode()
        tmp = self.root / f"{TEMP_PREFIX}{_MANIFEST_NAME}"
        _write_durably(tmp, text)
        os.replace(tmp, self.root / _MANIFEST_NAME)
        _fsync_dir(self.root)

    def _remove(self, path: Path, why: str, *, leftover: bool = True) -> None:
        """Deletes ``path``; a leftover's removal is reported, a routine one (keep_last) only if it fails."""
        try:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        except OSError as exc:
            report(self.telemetry, "state.cleanup_failed", "error", f"could not remove {path} ({why}): {exc}")
            return
        if leftover:
            report(self.telemetry, "state.leftovers_removed", "warning", f"removed {path}: {why}", file=path.name)

    def _manifest_has(self, sequence: int) -> bool:
        try:
            return json.loads((self.root / _MANIFEST_NAME).read_text(encoding="utf-8")).get("sequence") == sequence
        except (OSError, ValueError, AttributeError):
            return False

    @property
    def entries(self) -> tuple[ShardedCheckpointEntry, ...]:
        """Committed checkpoints, oldest first (read from the manifest; any rank may ask)."""
        return tuple(self._read_manifest()[0])

    # ---- writing -----------------------------------------------------------------------------------

    def write(
        self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, extra: Any = None
    ) -> ShardedCheckpointEntry:
        """Writes the model's and optimizer's shards and ``extra`` as the checkpoint of ``step`` and
        commits it; returns its manifest entry on every rank (collective).

        ``extra`` must load with ``weights_only=True`` (checked first, on every rank). If the ranks'
        ``extra`` differ, each rank's is kept and the checkpoint resumes on the same world size only.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        error: Exception | None = None
        try:
            check_loadable(extra, path=f"extra of the checkpoint of step {step}")
        except TypeError as exc:
            error = exc
        self._agree(error, f"checking the extra state of step {step}")
        steps = self._all_gather_json(step)
        if len(set(steps)) != 1:
            raise CheckpointError(f"ranks disagree on the step to checkpoint: {steps}; nothing was written")

        def prepare() -> dict[str, Any]:
            _, sequence = self._read_manifest()
            name = f"ckpt-{step:012d}-{sequence + 1:08d}"
            (self.root / f"{TEMP_PREFIX}{name}").mkdir()
            return {"name": name, "sequence": sequence + 1}

        plan = self._from_main(prepare, f"prepare the checkpoint of step {step}")
        name, staging = plan["name"], self.root / f"{TEMP_PREFIX}{plan['name']}"
        try:
            extra_per_rank = self._write_shards(staging, step, model, optimizer, extra)
            files = self._checksum_files(staging, step)
            entry = ShardedCheckpointEntry(
                step, name, plan["sequence"], time.time(), self.world_size, extra_per_rank, files
            )
            self._from_main(lambda: self._commit(staging, entry), f"commit the checkpoint of step {step}")
        except BaseException:
            if self.rank == 0 and staging.exists():
                self._remove(staging, f"the write of step {step} failed")
            raise
        self.telemetry.event(
            "state.checkpoint_committed",
            message=f"sharded checkpoint of step {step} committed as {name} by {self.world_size} ranks",
            step=step,
            file=name,
            world_size=self.world_size,
        )
        return entry

    def _write_shards(
        self, staging: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, extra: Any
    ) -> bool:
        buffer = io.BytesIO()
        torch.save({"step": step, "extra": extra}, buffer)
        blob = buffer.getvalue()
        digests = self._all_gather_json(hashlib.sha256(blob).hexdigest())
        per_rank = len(set(digests)) > 1
        error: Exception | None = None
        try:
            model_state, optimizer_state = get_state_dict(model, optimizer)
            writer = dcp.FileSystemWriter(staging, sync_files=True)
            state = {"model": model_state, "optimizer": optimizer_state}
            dcp.save(state, storage_writer=writer, process_group=self.group, no_dist=not self._live)
            if per_rank or self.rank == 0:
                _write_durably(staging / (f"extra-{self.rank}.pt" if per_rank else _EXTRA), blob)
        except (Exception, CheckpointException) as exc:  # agreed on below
            error = exc if isinstance(exc, Exception) else CheckpointError(f"DCP's save failed: {exc}")
        self._agree(error, f"writing the shards of step {step}")
        return per_rank

    def _checksum_files(self, staging: Path, step: int) -> dict[str, list[Any]]:
        """Every file of the folder, checksummed by the ranks in turn (file i by rank i mod W)."""
        names = self._from_main(lambda: sorted(p.name for p in staging.iterdir()), f"list the files of step {step}")
        mine: dict[str, list[Any]] = {}
        error: Exception | None = None
        try:
            for name in names[self.rank :: self.world_size]:
                if not _FILE_NAME.match(name) or not (staging / name).is_file():
                    raise CheckpointError(f"{staging / name}: not a plain file; DCP wrote something unexpected")
                digest, nbytes = _hash_file(staging / name, self.checksum)
                mine[name] = [nbytes, digest]
        except Exception as exc:  # agreed on below
            error = exc
        self._agree(error, f"checksumming the files of step {step}")
        return {name: record for part in self._all_gather_json(mine) for name, record in part.items()}

    def _commit(self, staging: Path, entry: ShardedCheckpointEntry) -> None:
        """Rank 0: the folder into place, then the manifest, then old checkpoints out."""
        _fsync_dir(staging)
        os.replace(staging, self.root / entry.dir)
        _fsync_dir(self.root)
        entries, _ = self._read_manifest()
        kept = [e for e in entries if e.step != entry.step] + [entry]
        dropped = [(e, "replaced by the new one") for e in entries if e.step == entry.step]
        dropped += [(e, f"beyond keep_last={self.keep_last}") for e in kept[: -self.keep_last]]
        try:
            self._write_manifest(kept[-self.keep_last :], entry.sequence)
        except BaseException:
            if not self._manifest_has(entry.sequence):  # renamed into place but not fsynced: it stays listed
                self._remove(self.root / entry.dir, f"the manifest update for step {entry.step} failed")
            raise
        for old, why in dropped:
            self._remove(self.root / old.dir, f"checkpoint of step {old.step} {why}", leftover=False)

    # ---- reading -----------------------------------------------------------------------------------

    def _verify(self, entry: ShardedCheckpointEntry) -> str | None:
        """Why ``entry`` cannot be used (None if it can), the same answer on every rank; its files are
        checked by the ranks in turn."""
        folder = self.root / entry.dir
        problem = None
        if entry.extra_per_rank and entry.world_size != self.world_size:
            problem = (
                f"its extra state differs per rank (shard-local aggregator state), written on {entry.world_size} "
                f"ranks, so it resumes on {entry.world_size} ranks only, not {self.world_size}"
            )
        try:
            for name in sorted(entry.files)[self.rank :: self.world_size]:
                nbytes, checksum = entry.files[name]
                algorithm = checksum.split(":", 1)[0]
                if problem is None and algorithm not in checksum_algorithms():
                    problem = f"{name}: checksum algorithm {algorithm!r} is not available here"
                if problem is not None:
                    break
                path = folder / name
                if not path.is_file():
                    problem = f"{path}: the file is missing"
                elif path.stat().st_size != nbytes:
                    problem = f"{path}: {path.stat().st_size} bytes on disk, the manifest records {nbytes}"
                elif (found := _hash_file(path, algorithm)[0]) != checksum:
                    problem = f"{path}: checksum mismatch: the file hashes to {found}, the manifest records {checksum}"
        except OSError as exc:
            problem = f"reading {folder} failed: {exc}"
        problems = [p for p in self._all_gather_json(problem) if p is not None]
        return f"checkpoint of step {entry.step} ({folder}): " + "; ".join(problems) if problems else None

    def load_newest(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> ShardedRestored:
        """Restores the newest committed checkpoint that verifies into ``model`` and ``optimizer``
        (collective; any world size, DCP reshards). Returns its step and ``extra`` on every rank.

        A checkpoint whose files do not match the manifest, or that asks to run code, is reported and
        the previous one is used; if none is left, :class:`CheckpointError` says why for each. One
        that verifies but does not fit the model or optimizer raises (:class:`StateMismatchError`),
        nothing changed.
        """
        listing = self._from_main(lambda: [asdict(e) for e in self._read_manifest()[0]], "read the manifest")
        entries = [ShardedCheckpointEntry.from_json(e) for e in listing]
        if not entries:
            raise CheckpointError(f"no committed sharded checkpoint in {self.root}")
        failures = []
        for entry in sorted(entries, key=lambda e: e.sequence, reverse=True):
            problem = self._verify(entry)
            if problem is None:
                try:
                    return self._load(entry, model, optimizer)
                except CheckpointError as exc:
                    problem = str(exc)
            failures.append(problem)
            if self.rank == 0:
                report_fallback(self.telemetry, problem, entry.step, entry.dir)
        raise CheckpointError(f"no committed sharded checkpoint in {self.root} verifies: " + "; ".join(failures))

    def _agree_typed(self, error: Exception | None, source: str) -> None:
        """Raises on every rank if any failed: a :class:`CheckpointError` if any rank found the
        checkpoint at fault (a refused or unreadable file), else a :class:`StateMismatchError`."""
        outcomes = self._all_gather_json(None if error is None else [type(error).__name__, str(error)])
        if error is not None:
            raise error
        failed = [(r, o) for r, o in enumerate(outcomes) if o is not None]
        if failed:
            kind = CheckpointError if any(o[0] == "CheckpointError" for _, o in failed) else StateMismatchError
            rank, (_, message) = failed[0]
            raise kind(f"{source}: failed on rank {rank}: {message}")

    def _load(
        self, entry: ShardedCheckpointEntry, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> ShardedRestored:
        folder = self.root / entry.dir
        source = f"checkpoint of step {entry.step} ({folder})"
        extra_name = f"extra-{self.rank}.pt" if entry.extra_per_rank else _EXTRA
        reader = VerifiedMetadataReader(folder, entry.files)
        error: Exception | None = None
        saved: Any = None
        try:  # what DCP itself would trust, checked first: its pickled metadata, and the extra state
            reader.read_metadata()
            saved = torch.load(folder / extra_name, map_location="cpu", weights_only=True)
            if not isinstance(saved, dict) or saved.get("step") != entry.step:
                raise CheckpointError(f"{source}: {extra_name} does not hold the extra state of step {entry.step}")
        except CheckpointError as exc:
            error = exc
        except Exception as exc:  # weights_only refused it, or it is no torch.save file
            error = CheckpointError(f"{source}: {extra_name} refused by torch.load(weights_only=True): {exc}")
        self._agree_typed(error, source)
        model_state, optimizer_state = get_state_dict(model, optimizer)
        # Fresh tensors of the same sharding: the live ones change only once every rank has read.
        fresh = map_tensors({"model": model_state, "optimizer": optimizer_state}, torch.empty_like)
        planner = WeightsOnlyLoadPlanner(source)
        try:
            dcp.load(fresh, storage_reader=reader, planner=planner, process_group=self.group, no_dist=not self._live)
        except (Exception, CheckpointException) as exc:  # on every rank; the planner knows what it refused
            error = planner.refusal or StateMismatchError(
                f"{source}: does not load into the model and optimizer: {type(exc).__name__}: {exc}"
            )
        self._agree_typed(error, source)
        try:
            set_state_dict(model, optimizer, model_state_dict=fresh["model"], optim_state_dict=fresh["optimizer"])
        except Exception as exc:
            raise StateError(
                f"{source}: read on every rank, but copying it into the model and optimizer failed "
                f"({type(exc).__name__}: {exc}); they may now be inconsistent"
            ) from exc
        self.telemetry.event(
            "state.restored", message=f"restored the sharded {source}", step=entry.step, file=entry.dir
        )
        return ShardedRestored(entry.step, saved["extra"], entry.dir, entry.sequence)
