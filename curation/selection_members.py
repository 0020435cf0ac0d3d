"""A selection's members as a table, behind the catalog's `selected` view:

    selections/<name>/members.parquet   one row per sample of the curated shards: selection,
                                        sample_id, weight, shard (the tar's file name), position

`select` writes it beside the tars it wrote (from `ShardSink.members`, plus one read of any mixed
synthetic tars), so it moves with the selection in the same atomic swap. A selection written before
this file existed gets it from one read of its tars (`backfill`), under the selection's writer lock,
so it never describes a version that a concurrent select is replacing.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from . import schemas
from .errors import WebdistillError
from .files import name_lock
from .workspace import Workspace, inside, write_parquet_atomic

MEMBERS_FILE = "members.parquet"


def tar_members(path: Path) -> list[dict]:
    """sample_id (the tar key), weight and position of every sample in one curated tar."""
    from .shard_writer import sample_weight  # webdataset and torch: only where a tar is read
    from .shards import TruncatedShard, iter_samples

    rows = []
    try:
        with open(path, "rb") as stream:
            for position, raw in enumerate(iter_samples(stream)):
                rows.append({"sample_id": raw.key, "weight": sample_weight(raw.files.get("json")),
                             "shard": path.name, "position": position})
    except TruncatedShard:
        pass  # the complete samples before the cut are the members a reader sees
    return rows


def write_members(folder: Path, selection: str, members: list[dict]) -> Path:
    """Write `members` (dicts of sample_id, weight, shard, position) as the folder's members.parquet."""
    columns = {"selection": [selection] * len(members)}
    for column in ("sample_id", "weight", "shard", "position"):
        columns[column] = [m[column] for m in members]
    path = folder / MEMBERS_FILE
    write_parquet_atomic(pa.Table.from_pydict(columns, schema=schemas.SELECTED), path)
    return path


def backfill(ws: Workspace) -> list[str]:
    """Write members.parquet for every finished selection that has none (selections written before
    it existed): one read of its tars each. Returns the selections it wrote."""
    root = ws.root / "selections"
    written = []
    for manifest in sorted(root.glob("*/manifest.json")) if root.is_dir() else ():
        try:
            folder = ws.owned("selections", manifest.parent.name)  # no temporaries, no planted links
        except WebdistillError:
            continue
        if (folder / MEMBERS_FILE).exists():
            continue
        with name_lock(root, folder.name, wait=False) as free:
            if not free:
                continue  # a select is writing this name: it writes the file itself
            from .shard_writer import read_manifest  # webdataset and torch: only for a selection to backfill

            listed = read_manifest(folder).get("shards") or []
            tars = [folder / s["path"] for s in listed if isinstance(s, dict) and isinstance(s.get("path"), str)]
            if not tars or not all(t.is_file() and inside(t, folder) for t in tars):
                continue  # not a selection this version can read: left out of the view
            write_members(folder, folder.name, [m for t in tars for m in tar_members(t)])
            written.append(folder.name)
    return written
