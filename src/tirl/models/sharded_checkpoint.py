"""A sharded Lightning checkpoint (``hardware=fsdp``): recognise the directory and read its policy on one process.

Lightning's ``ModelParallelStrategy`` (``save_distributed_checkpoint=True``) writes each checkpoint as a directory,
``last.ckpt/`` or ``step_000100.ckpt/``, in torch's distributed-checkpoint (DCP) format:
- ``__<rank>_0.distcp``: each rank's shards of the weights (key ``state_dict.<module attribute>.<param>``, e.g.
  ``state_dict.policy.model.embed_tokens.weight``) and of the optimizer state (``optimizer_0.…``);
- ``.metadata``: which shard of which tensor lies where (written once the shards are complete);
- ``meta.pt``: everything else (hyper-parameters, loop and callback state, datamodule position, each rank's RNG
  streams), a plain ``torch.save`` from rank 0.
Resuming (``ckpt_path=<dir>``) goes back through Lightning on any number of ranks (DCP reshards). Reading the
policy for export, evaluation or ``init_from`` uses ``torch.distributed.checkpoint.load`` with ``no_dist=True``:
one process, no process group, and only the policy's tensors are read (not the optimizer state, twice the
weights under Adam).
"""

from __future__ import annotations

import warnings
from pathlib import Path

METADATA = ".metadata"      # DCP's index, written last
META = "meta.pt"            # Lightning's non-tensor part
WEIGHTS_PREFIX = "state_dict.policy."


# What every reader (resume, init_from, export, evaluation) says of a path that is no checkpoint at all.
NOT_A_CHECKPOINT = "is neither a file nor a sharded checkpoint directory"


def is_checkpoint_path(path: str | Path) -> bool:
    """Whether ``path`` is a file (a ``.ckpt``) or a directory holding any part of a sharded checkpoint; when not,
    every reader says ``NOT_A_CHECKPOINT``."""
    return Path(path).expanduser().is_file() or looks_sharded(path)


def looks_sharded(path: str | Path) -> bool:
    """Whether ``path`` is a directory that holds any part of a sharded checkpoint (complete or not)."""
    p = Path(path).expanduser()
    return p.is_dir() and ((p / METADATA).exists() or (p / META).exists() or any(p.glob("*.distcp")))


def sharded_checkpoint_problem(path: str | Path) -> str | None:
    """None for a complete sharded checkpoint directory; else one sentence saying what is missing and what to do."""
    p = Path(path).expanduser()
    missing = [name for name in (METADATA, META) if not (p / name).is_file()]
    if not any(p.glob("*.distcp")):
        missing.append("the *.distcp shard files")
    if not missing:
        missing = missing_storage_files(p)
    if not missing:
        return None
    return (f"'{path}' is an incomplete sharded checkpoint directory (no {' and no '.join(missing)}): the run was "
            f"probably stopped while saving, or files were lost when it was copied; pass an earlier checkpoint of "
            f"that run (e.g. step_<n>.ckpt/) or last.ckpt/.")


def missing_storage_files(path: str | Path) -> list[str]:
    """The shard files (``__<rank>_0.distcp``) that the ``.metadata`` index of the directory ``path`` refers to and
    that are not there (sorted names); ``[".metadata (unreadable)"]`` when the index itself cannot be read. Reads
    the index only, not the shards."""
    import torch.distributed.checkpoint as dcp

    p = Path(path).expanduser()
    try:
        storage = dcp.FileSystemReader(str(p)).read_metadata().storage_data or {}
    except Exception:   # a truncated or foreign index
        return [f"readable {METADATA}"]
    names = {getattr(info, "relative_path", None) for info in storage.values()}
    return sorted(name for name in names if name and not (p / name).is_file())


def read_sharded_checkpoint(path: str | Path) -> tuple[dict, dict]:
    """(the policy's weights as full CPU tensors, ``policy.`` prefix removed; the rest of the checkpoint: Lightning's
    ``meta.pt`` with ``hyper_parameters``, loops, RNG…) of a sharded checkpoint directory, read on this one process.

    Raises ValueError (one sentence) for an incomplete directory or one that holds no policy weights."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    p = Path(path).expanduser()
    problem = sharded_checkpoint_problem(p)
    if problem:
        raise ValueError(problem)
    reader = dcp.FileSystemReader(str(p))
    entries = reader.read_metadata().state_dict_metadata
    wanted = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
              for key, meta in entries.items()
              if key.startswith(WEIGHTS_PREFIX) and isinstance(meta, TensorStorageMetadata)}
    if not wanted:
        raise ValueError(f"'{path}' is a sharded checkpoint without policy weights (no {WEIGHTS_PREFIX}* tensors); "
                         f"pass a checkpoint directory written by a tirl run.")
    with warnings.catch_warnings():   # "torch.distributed is … uninitialized, assuming … a single process": yes
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(wanted, storage_reader=reader, no_dist=True)   # fills the tensors in place
    try:   # tirl saves plain containers only, so no pickled code from a downloaded directory ever runs
        meta = torch.load(p / META, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"'{p / META}' could not be read ({type(err).__name__}); pass a checkpoint directory "
                         f"written by a tirl run.") from None
    return {key[len(WEIGHTS_PREFIX):]: t for key, t in wanted.items()}, dict(meta)


def checkpoint_layout(path: str | Path) -> tuple[set[str], dict]:
    """(the names in a checkpoint's ``state_dict``, e.g. ``policy.model.embed_tokens.weight``,
    ``frozen_ref.model.…``; its ``hyper_parameters``) without reading its weights: a sharded directory's
    ``.metadata`` index and ``meta.pt``, or a ``.ckpt`` file opened memory-mapped (tensors not read).

    Raises ValueError (one sentence) when the file or directory cannot be read as a checkpoint."""
    import torch
    import torch.distributed.checkpoint as dcp

    p = Path(path).expanduser()
    try:
        if looks_sharded(p):
            entries = dcp.FileSystemReader(str(p)).read_metadata().state_dict_metadata
            keys = {k[len("state_dict."):] for k in entries if k.startswith("state_dict.")}
            meta = torch.load(p / META, map_location="cpu", weights_only=True)
        else:
            meta = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
            keys = set((meta.get("state_dict") or {}) if isinstance(meta, dict) else ())
    except Exception as err:   # a truncated file, an HF .bin, a foreign pickle
        raise ValueError(f"'{path}' could not be read as a Lightning checkpoint ({type(err).__name__}); pass a "
                         f"checkpoint written by a tirl run.") from None
    hparams = meta.get("hyper_parameters") if isinstance(meta, dict) else None
    return keys, dict(hparams or {})
