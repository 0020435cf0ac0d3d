"""The one helper for each small job: an error's line, what is remote, atomic files, the folder swap,
the user-error base class, and values passed to SQL as parameters."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from torch.utils.data import DataLoader, Dataset

from curation import catalog
from curation.errors import WebdistillError, first_line
from curation.files import atomic_path, is_remote
from curation.remote import RemoteWorkspaceError, synced
from curation.shard_writer import staging, swap_into_place
from curation.user_sql import sql_literal
from curation.workspace import Workspace, resolve_workspace
from distill.config import ConfigError
from distill.data import DataError
from distill.launch import DistillJobError
from distill.losses import LossConfigError
from distill.spec import ModelSpecError
from distill.students import StudentError
from distill.train import JobError, PeerLost, main

from .conftest import ROOT


# -- first_line ---------------------------------------------------------------------------------
def test_first_line_takes_the_first_non_blank_line_and_cuts_it():
    assert first_line(ValueError("\n  first: a\nsecond\nthird")) == "first: a"
    assert first_line(ValueError("abcdef"), limit=3) == "abc"
    assert first_line(ValueError("abc"), limit=None) == "abc"


def test_first_line_of_an_error_without_a_message_is_its_class_name():
    assert first_line(KeyboardInterrupt()) == "KeyboardInterrupt"
    assert first_line(ValueError("   \n ")) == "ValueError"


class _Broken(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i):
        raise DataError(f"shard {i}.tar: no image: bad member")


def test_first_line_of_a_dataloader_workers_error_is_the_workers_message():
    loader = DataLoader(_Broken(), batch_size=1, num_workers=1)
    with pytest.raises(DataError) as err:
        next(iter(loader))
    assert "Original Traceback" in str(err.value)  # torch wraps the worker's error in its traceback
    assert first_line(err.value) == "shard 0.tar: no image: bad member"


# -- is_remote ----------------------------------------------------------------------------------
@pytest.mark.parametrize("location", ["pipe:curl -s http://h/a.tar", "pipe:cat /x.tar", "s3://bucket/ws",
                                      "gs://b/x.tar", "http://host/a.tar", "https://host/a.tar?sig=x",
                                      "memory://ws"])
def test_remote_locations_and_commands_are_remote(location):
    assert is_remote(location)


@pytest.mark.parametrize("location", ["file:///data/ws", "/data/ws", "ws", "./a/b.tar", "C:\\data\\ws", "C:/data/ws",
                                      "", None, 3])
def test_local_paths_are_not_remote(location):
    assert not is_remote(location)


def test_a_pipe_command_is_never_a_workspace_folder(tmp_path):
    with pytest.raises(WebdistillError, match="pipe: command"):
        resolve_workspace("pipe:ls")
    with pytest.raises(RemoteWorkspaceError, match="pipe: command"):
        with synced("pipe:ls"):
            pass
    assert not (tmp_path / "pipe:ls").exists() and not os.path.exists("pipe:ls")


# -- atomic_path --------------------------------------------------------------------------------
def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    final = tmp_path / "out" / "a.json"
    with atomic_path(final) as tmp:
        tmp.write_text("old")
    with pytest.raises(RuntimeError, match="writer died"):
        with atomic_path(final) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("writer died")
    assert final.read_text() == "old"
    assert sorted(p.name for p in final.parent.iterdir()) == ["a.json"]
    with atomic_path(final) as tmp:
        tmp.write_text("new")
    assert final.read_text() == "new" and sorted(p.name for p in final.parent.iterdir()) == ["a.json"]
    assert final.stat().st_mode & 0o777 == 0o666 & ~_umask()  # an ordinary file, not mkstemp's 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- the staged-folder swap ---------------------------------------------------------------------
def _write_version(folder, n: int) -> None:
    (folder / "part.txt").write_text(str(n))
    (folder / "manifest.json").write_text(json.dumps({"version": n}))


def _version(folder) -> int:
    manifest = json.loads((folder / "manifest.json").read_text())["version"]
    assert (folder / "part.txt").read_text() == str(manifest)  # never a mix of two versions
    return manifest


def test_the_swap_leaves_the_old_folder_or_the_new_one(tmp_path):
    final = tmp_path / "selections" / "sel"
    with staging(final) as tmp:
        _write_version(tmp, 1)
        swap_into_place(tmp, final)
    assert _version(final) == 1
    with pytest.raises(RuntimeError, match="writer died"):
        with staging(final) as tmp:
            (tmp / "part.txt").write_text("2")  # half of version 2
            raise RuntimeError("writer died")
    assert _version(final) == 1
    with staging(final) as tmp:
        _write_version(tmp, 2)
        swap_into_place(tmp, final)
    assert _version(final) == 2
    assert sorted(p.name for p in final.parent.iterdir()) == [".lock-sel", "sel"]  # no temporary left


# -- one user-error base ------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [ConfigError, DataError, LossConfigError, ModelSpecError, StudentError, JobError,
                                 DistillJobError, PeerLost])
def test_distills_errors_are_webdistill_errors_and_keep_their_old_bases(cls):
    assert issubclass(cls, WebdistillError)
    assert issubclass(cls, (ValueError, RuntimeError))  # callers that caught those still do


def test_distill_train_exits_2_with_one_line_on_a_user_error(tmp_path, capfd):
    assert main([str(tmp_path / "missing.yaml")]) == 2
    err = capfd.readouterr().err
    assert err.splitlines() == [f"distill: error: config file not found: {tmp_path / 'missing.yaml'}"]


def test_the_distillation_job_imports_neither_duckdb_pyarrow_nor_prefect():
    code = ("import sys, distill.train, distill.config, distill.launch; "
            "print(sorted(m for m in ('duckdb', 'pyarrow', 'prefect') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    assert out.strip() == "[]"


# -- values as SQL parameters -------------------------------------------------------------------
def test_sql_literal_quotes_one_value():
    assert sql_literal("it's") == "'it''s'" and sql_literal(None) == "NULL"


def test_values_pass_as_parameters_and_view_ddl_survives_a_quote_in_the_path(tmp_path):
    ws = Workspace(tmp_path / "o'brien's ws")  # quoted by sql_literal in the views and allowed_directories
    catalog.refresh(ws)
    ids = ["a'1", "b\"2", "c); DROP TABLE runs; --"]
    got = catalog.query(ws, "SELECT unnest($ids::VARCHAR[]) AS sample_id, $name AS name",
                        params={"ids": ids, "name": "x'y"}).to_pylist()
    assert [r["sample_id"] for r in got] == ids and {r["name"] for r in got} == {"x'y"}
    assert catalog.query(ws, "SELECT count(*) AS n FROM samples WHERE sample_id IN (SELECT unnest(?::VARCHAR[]))",
                         params=[ids]).to_pylist() == [{"n": 0}]
    assert catalog.query(ws, "SELECT count(*) AS n FROM runs").to_pylist() == [{"n": 0}]
