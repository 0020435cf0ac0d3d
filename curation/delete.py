"""Deleting one named artifact: a selection, a student, a kNN score, a scoring run or a synthetic set.

Its folder (or file) goes, only under the workspace folder that kind lives in (a planted symlink or
a name that leaves it is refused), then its catalog row and the views: the `candidates` view stops
listing a deleted kNN score's column at once, instead of after a manual `rm` and a stale view.
"""
from __future__ import annotations

import os
from pathlib import Path

from . import catalog
from .errors import WebdistillError
from .workspace import Workspace, remove_tree

# kind -> (workspace folder, file suffix for kinds stored as one file, catalog table with a row per name)
KINDS = {
    "selection": ("selections", None, "selections"),
    "student": ("students", None, "students"),
    "knn-score": ("knn_scores", ".parquet", None),
    "score-run": ("scores", None, None),
    "synthetic": ("synthetic", None, None),
}


class NothingToDelete(WebdistillError):
    """No artifact of that kind and name."""


def _existing(ws: Workspace, folder: str) -> list[str]:
    root = ws.root / folder
    return sorted(p.name.removesuffix(".parquet") for p in root.iterdir()
                  if not p.name.startswith(".")) if root.is_dir() else []


def delete(ws: Workspace, kind: str, name: str) -> Path:
    """Delete the artifact `kind` `name` and its catalog row; return the path that went."""
    folder, suffix, table = KINDS[kind]
    path = ws.owned(folder, name + (suffix or ""), what=f"{kind} name")
    if not (path.is_file() if suffix else path.is_dir()) or path.is_symlink():
        there = ", ".join(_existing(ws, folder)) or "none"
        raise NothingToDelete(f"no {kind} {name!r} in {ws.root / folder} (there: {there})")
    if suffix:
        os.unlink(path)
    else:
        remove_tree(path, ws.root / folder)
    if table:
        catalog.forget(ws, table, name)
    catalog.refresh(ws)  # views over what is left: candidates loses a deleted score's columns
    return path
