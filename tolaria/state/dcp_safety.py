"""Reading a ``torch.distributed.checkpoint`` (DCP) folder without running code from it.

DCP's own reader trusts the folder: ``FileSystemReader.read_metadata`` unpickles ``.metadata`` with
plain :mod:`pickle` (any callable the file names runs), and ``DefaultLoadPlanner.load_bytes`` loads
every non-tensor value (the optimizer's hyperparameters, say) with ``torch.load(weights_only=False)``.
Tensor data it already reads with ``weights_only=True``. Here:

- :class:`VerifiedMetadataReader` unpickles ``.metadata`` with an allowlist
  (:class:`MetadataUnpickler`: DCP's metadata dataclasses, ``torch.Size``, dtypes, layouts, paths;
  anything else is refused before it is constructed) and checks that every data file the metadata
  points at is one of ``allowed_files`` (those whose checksums the caller verified), so DCP opens no
  other file;
- :class:`WeightsOnlyLoadPlanner` loads the non-tensor values with ``torch.load(weights_only=True)``
  and refuses a checkpoint that holds state the live objects have no place for (optimizer state saved
  for parameters a fresh optimizer has none for would otherwise be dropped without a word).

A refusal raises :class:`~tolaria.state.CheckpointError` naming the file and what it asked for.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Collection
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element  # DCP's own nested setter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from tolaria.state.errors import CheckpointError, StateMismatchError

__all__ = ["MetadataUnpickler", "VerifiedMetadataReader", "WeightsOnlyLoadPlanner", "load_metadata"]

_DCP_METADATA_CLASSES = (
    "BytesStorageMetadata",
    "ChunkStorageMetadata",
    "Metadata",
    "MetadataIndex",
    "StorageMeta",
    "TensorProperties",
    "TensorStorageMetadata",
    "_MEM_FORMAT_ENCODING",
)
_ALLOWED_GLOBALS = frozenset(
    {("torch.distributed.checkpoint.metadata", name) for name in _DCP_METADATA_CLASSES}
    | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # maps a layout's name to the torch.layout object
        ("collections", "OrderedDict"),
    }
    | {(module, cls) for module in ("pathlib", "pathlib._local") for cls in ("PosixPath", "PurePosixPath")}
)


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` and nothing else: every global the pickle names must be on the
    allowlist (DCP's metadata classes, ``torch.Size``, dtypes, layouts, paths) or the load stops."""

    def __init__(self, file: Any, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(
            f"{self.source}: refused: its pickle asks for {module}.{name}, which is not part of DCP's metadata "
            "(only DCP's metadata classes, torch.Size, dtypes and layouts are loaded)"
        )


def load_metadata(path: str | os.PathLike[str]) -> Metadata:
    """DCP's ``.metadata`` at ``path``, unpickled through :class:`MetadataUnpickler`."""
    source = str(path)
    try:
        with open(path, "rb") as file:
            metadata = MetadataUnpickler(file, source).load()
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{source}: unreadable DCP metadata: {type(exc).__name__}: {exc}") from exc
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{source}: holds a {type(metadata).__qualname__}, not DCP's Metadata")
    return metadata


class VerifiedMetadataReader(FileSystemReader):
    """DCP's file-system reader with a safe ``.metadata`` load, reading only ``allowed_files``."""

    def __init__(self, path: str | os.PathLike[str], allowed_files: Collection[str]):
        super().__init__(path)
        self.allowed_files = frozenset(allowed_files)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        if os.path.basename(path) not in self.allowed_files:
            raise CheckpointError(f"{path}: refused: the manifest does not vouch for this metadata file")
        metadata = load_metadata(path)
        storage = metadata.storage_data
        if not isinstance(storage, dict):
            raise CheckpointError(f"{path}: the metadata has no storage table")
        named = {getattr(info, "relative_path", None) for info in storage.values()}
        outside = sorted(map(str, named - self.allowed_files))
        if outside:
            raise CheckpointError(
                f"{path}: refused: the metadata points at files the manifest does not vouch for: {outside[:5]}"
            )
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, with ``weights_only=True`` for non-tensor values and no silent drops.

    ``refusal`` holds the :class:`~tolaria.state.CheckpointError` it raised, if any (DCP wraps the
    errors of its ranks, so the caller looks here to tell a refused file from a mismatch).
    """

    def __init__(self, source: str):
        super().__init__()
        self.source = source
        self.refusal: CheckpointError | None = None

    def create_local_plan(self) -> Any:
        saved = set(self.metadata.state_dict_metadata) if self.metadata is not None else set()
        unplaced = sorted(saved - set(self.state_dict))
        if unplaced:
            raise StateMismatchError(
                f"{self.source}: the checkpoint holds {len(unplaced)} entries the live model and optimizer have no "
                f"place for (e.g. {unplaced[:3]}); an optimizer without state yet must get it before loading, "
                "or training would go on from fresh optimizer state"
            )
        return super().create_local_plan()

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            self.refusal = CheckpointError(
                f"{self.source}: refused: the value of {read_item.dest_index.fqn!r} needs code to load, which "
                f"weights_only=True never runs ({exc})"
            )
            raise self.refusal from exc
        if self.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes places it
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded
