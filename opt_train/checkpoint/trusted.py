"""Reading a checkpoint's DCP files without running code from them.

DCP's `.metadata` index is a pickle, and `pickle.load` calls any global a file names: a
`.metadata` rewritten by someone who can write the run_dir would run its code on resume and on
export. Here it is unpickled allowing only DCP's plain metadata classes, refused unless every
entry is a tensor (DCP's default load planner `torch.load(weights_only=False)`s an entry
declared as bytes, which this project never writes: `opt_train.checkpoint.weights`), and every
DCP read in the project goes through `load_dcp`.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

# A one-process run passes DCP `no_dist=True` on purpose (no process group), and DCP then warns
# at every save and load, from its writer threads too, that it assumes a single process. The
# filter is process-wide because async saves warn after the call has returned.
warnings.filterwarnings(
    "ignore",
    "torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to",
    UserWarning,
)


class CorruptCheckpoint(RuntimeError):
    """A checkpoint directory that is incomplete or whose bytes changed after it was written."""


# The globals DCP's `.metadata` pickle names (torch 2.13; every one a plain data holder) and
# nothing else: `pickle.load` would call any global a file names, so a `.metadata` rewritten
# by someone who can write the run_dir would run its code on resume and on export.
_DCP_GLOBALS = {
    *(
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "ChunkStorageMetadata",
            "BytesStorageMetadata",  # read, to be refused by name below
            "_MEM_FORMAT_ENCODING",
        )
    ),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a name -> torch.layout lookup
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _DCPMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"names {module}.{name}, which a DCP index never holds")


def read_dcp_metadata(path: Path) -> Metadata:
    """DCP's `.metadata` index of checkpoint `path`, unpickled allowing only DCP's metadata
    classes, torch.Size, dtypes and plain containers, and refused (CorruptCheckpoint) unless
    every entry is a tensor stored as DCP writes it: DCP's default load planner
    `torch.load(weights_only=False)`s an entry declared as bytes, which this project never
    writes (`opt_train.checkpoint.weights`), and a transform or a path outside the checkpoint
    is not ours either."""
    f = path / ".metadata"
    try:
        with open(f, "rb") as fh:
            md = _DCPMetadataUnpickler(fh).load()
    except Exception as e:  # anything a damaged or hostile pickle raises while being refused
        raise CorruptCheckpoint(f"{f}: not a DCP index this project reads: {e}") from None
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise CorruptCheckpoint(f"{f}: not a DCP index (holds {type(md).__name__})")
    untrusted = sorted(
        k for k, v in md.state_dict_metadata.items() if not isinstance(v, TensorStorageMetadata)
    )
    if untrusted:
        shown = ", ".join(map(str, untrusted[:3])) + (" ..." if len(untrusted) > 3 else "")
        raise CorruptCheckpoint(
            f"{f}: declares {len(untrusted)} non-tensor entries ({shown}); this project "
            "writes only tensors, and DCP would unpickle those with code execution allowed"
        )
    for info in (md.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or "/" in rel or rel in ("", ".", ".."):
            raise CorruptCheckpoint(f"{f}: a data file named {rel!r}, outside the checkpoint")
        if getattr(info, "transform_descriptors", None):
            raise CorruptCheckpoint(
                f"{f}: {rel} declares transforms {info.transform_descriptors}, never written here"
            )
    return md


class TrustedReader(dcp.FileSystemReader):
    """DCP's reader with `.metadata` read by `read_dcp_metadata` instead of `pickle.load`
    (or handed in, already read that way)."""

    def __init__(self, path: Path, metadata: Metadata | None = None):
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self, *args, **kwargs) -> Metadata:
        md = self._metadata or read_dcp_metadata(Path(self.path))
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class TensorsOnlyPlanner(DefaultLoadPlanner):
    """DCP's default load planner, less its `torch.load(weights_only=False)` of bytes entries
    (TrustedReader already refuses an index that declares one; this holds if that changes)."""

    def load_bytes(self, read_item, value) -> None:
        raise CorruptCheckpoint(
            f"DCP entry {read_item.dest_index.fqn} is pickled bytes; only tensors are loaded"
        )


def load_dcp(state: dict, path: Path, group=None) -> None:
    """`dcp.load` of `state` from checkpoint `path`, running no code from its files: every
    DCP read in the project goes through here."""
    md = read_dcp_metadata(path)  # here, so its refusal is raised as itself: DCP rewraps a
    # reader's error; the reader is handed the index rather than unpickling it again
    dcp.load(
        state,
        storage_reader=TrustedReader(path, md),
        planner=TensorsOnlyPlanner(),
        process_group=group,
        no_dist=group is None,
    )
