"""The workspace: a directory of per-shard artifacts plus `catalog.duckdb`.

Every artifact is written under a temporary name and renamed into place, so a crash
leaves either nothing or a whole file, never half of one.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import UnsafeName, WebdistillError

# atomic_path and its kin live in files.py (distill uses them too); stage modules import them from here
from .files import (  # noqa: F401
    atomic_path,
    discard,
    is_remote,
    storage_errors,
    sweep_stale_temporaries,
    temporary_name,
)

DEFAULT_WORKSPACE = "./workspace"


def resolve_workspace(path: str | os.PathLike | None = None) -> Workspace:
    """`path`, else $WEBDISTILL_WORKSPACE, else ./workspace."""
    chosen = path or os.environ.get("WEBDISTILL_WORKSPACE") or DEFAULT_WORKSPACE
    if isinstance(chosen, str) and chosen.startswith("pipe:"):
        raise WebdistillError(f"the workspace {chosen!r} is a pipe: command: give a folder or an fsspec URL")
    if is_remote(chosen):
        # stages work on a local folder; `curation.remote.synced` mirrors a URL into one
        raise WebdistillError(f"{chosen} is a URL: open it with curation.remote.synced(url) (the CLI and "
                         "`webdistill run` do this)")
    return Workspace(Path(chosen.removeprefix("file://") if isinstance(chosen, str) else chosen))


# A name that becomes one path component: no separators, no leading dot (so never `.` or `..`),
# nothing a shell or a URL would read specially.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(name: object, what: str = "name") -> str:
    """Return `name` if it is safe as one path component, else raise UnsafeName (one line)."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise UnsafeName(f"{what} {name!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return name


def inside(path: Path, folder: Path) -> bool:
    """True when `path`, with every symlink resolved, lies under `folder` (also resolved)."""
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


@dataclass(frozen=True)
class Workspace:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())

    @property
    def catalog_path(self) -> Path:
        return self.root / "catalog.duckdb"

    def artifact_dir(self, *parts: str) -> Path:
        d = self.owned(*parts)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def owned(self, kind: str, *names: str, what: str | None = None) -> Path:
        """The path `<root>/<kind>/<name>...` for user-given or stored names: each name passes
        `check_name`, and the result (symlinks resolved) must stay under `<root>/<kind>`, so a
        workspace from elsewhere cannot point a stage's writes or deletes outside it."""
        for name in names:
            check_name(name, what or kind.rstrip("s"))
        folder = self.root / kind
        path = folder.joinpath(*names)
        if not inside(folder, self.root) or not inside(path, folder):
            raise UnsafeName(f"{path} resolves outside {folder}: refusing to use it")
        return path

    def embedders(self) -> list[str]:
        """The embedders whose embeddings this workspace holds (folders with an id map)."""
        folder = self.root / "embeddings"
        found = folder.iterdir() if folder.is_dir() else []
        return sorted(d.name for d in found if d.is_dir() and not d.is_symlink() and any(d.glob("*.parquet")))

    def no_embeddings(self, embedder: str) -> str:
        """The line for a missing embedder, naming the ones that exist (a typo, or another model)."""
        present = ", ".join(self.embedders()) or "none"
        return (f"no embeddings for {embedder!r} in {self.root} (it has: {present}); "
                f"pass one of those, or run `webdistill embed` first")


def remove_tree(path: Path, owner: Path) -> None:
    """Delete `path` only when it lies under `owner` (the folder the stage owns) and is not itself a
    symlink; anything else is refused, never followed."""
    path, owner = Path(path), Path(owner)
    if path.is_symlink() or not inside(path, owner) or path.resolve() == owner.resolve():
        raise UnsafeName(f"refusing to delete {path}: it is not a folder under {owner}")
    if path.exists():
        shutil.rmtree(path)


def write_parquet_atomic(table: pa.Table, final: Path, metadata: dict | None = None) -> None:
    """Write `table` to `final` atomically, with optional JSON-able key/value metadata."""
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({k.encode(): json.dumps(v).encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    with atomic_path(final) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read_parquet_metadata(path: Path) -> dict:
    """The JSON key/value metadata written by `write_parquet_atomic` ({} if unreadable)."""
    try:
        raw = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return {}
    out = {}
    for k, v in raw.items():
        try:
            out[k.decode()] = json.loads(v)
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
    return out


def config_hash(config: dict) -> str:
    """A short, stable hash of a stage's config: part of every artifact's skip key."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
