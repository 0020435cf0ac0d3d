"""Attack class: a command read back from stored data. A workspace (or a selection manifest) from
elsewhere names a shard as `pipe:<command>`; webdistill must never run it. Only a spec the user
typed may be a command: ingest runs it once and keeps a copy of its bytes in sources/, which every
later stage reads (DESIGN.md, Security model).

Every test plants the URL in real artifacts (a workspace ingested by the CLI, a manifest written as
select writes them) and checks that a marker file the command would create never appears."""
import hashlib
import json
import os
import shlex
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from curation import catalog
from curation.dup_verify import load_thumbnails
from curation.errors import UnsafeShardURL
from curation.ingest import ingest
from curation.shard_reader import load_images, shard_jobs
from curation.shards import iter_samples, open_stored_shard
from curation.workspace import Workspace
from distill.data import DataError, load_manifest
from flows.cli import main

from ..conftest import encode, meta, noise_image, run_cli, write_tar


def pipe_variants(marker: Path) -> list[str]:
    """`pipe:` commands in the forms a forged row may take; each would create `marker`."""
    m = shlex.quote(str(marker))
    return [f"pipe:touch {m}", f" pipe:touch {m}", f"\tpipe:touch {m}", f"PIPE:touch {m}", f"Pipe:touch {m}",
            f'"pipe:touch {m}"', f"pipe:cat /dev/null; touch {m}", f"pipe:$(touch {m})",
            f"pipe:true && touch {m} | cat", f"pipe:touch {m}\n/tmp/x.tar"]


def other_variants(tmp: Path) -> list[str]:
    """Stored URLs that are no command but would block, never end, or reach what a user never named."""
    fifo = tmp / "fifo.tar"
    if not fifo.exists():
        os.mkfifo(fifo)  # opening it for reading blocks until a writer comes: forever
    return ["relative/shard.tar", "/dev/zero", "file:///dev/zero", str(fifo), "simplecache::file:///etc/hostname",
            "ais://bucket/x.tar", "sftp://127.0.0.1/x.tar", ""]


def same_samples(copy: Path, original: Path) -> bool:
    """The copy holds the bytes ingest read, up to the tar's end: the same samples, read as a later stage would."""
    with open_stored_shard(str(copy)) as a, open(original, "rb") as b:
        return [(s.key, s.files) for s in iter_samples(a)] == [(s.key, s.files) for s in iter_samples(b)]


def shard_samples(prefix: str, n: int, seed: int) -> list[dict]:
    return [{"__key__": f"{prefix}{i}", "png": encode(noise_image(seed + i, (24, 20)), "PNG"),
             "json": meta(f"{prefix}{i}")}
            for i in range(n)]


@pytest.fixture(scope="module")
def typed(tmp_path_factory):
    """A workspace ingested by the CLI from a user-typed `pipe:` spec and a plain path. The command
    logs each run to runs.log, so the tests can count how often it ran."""
    root = tmp_path_factory.mktemp("typed")
    write_tar(root / "a.tar", shard_samples("a", 4, 0))
    write_tar(root / "b.tar", shard_samples("b", 3, 10))
    command = f"pipe:echo run >> {root / 'runs.log'}; cat {root / 'a.tar'}"
    done = run_cli("ingest", "-w", str(root / "ws"), command, str(root / "b.tar"), "--workers", "1")
    assert done.returncode == 0, done.stderr
    return root, command


def copy_workspace(typed, dest: Path) -> Workspace:
    """A copy of the typed workspace with its own catalog (views name their folder)."""
    shutil.copytree(typed[0] / "ws", dest)
    ws = Workspace(dest)
    catalog.refresh(ws)
    return ws


def plant(ws: Workspace, shard: str, url: str) -> None:
    """Rewrite `shard_url` in samples/<shard>.parquet as an attacker (or a SQL write) would."""
    path = ws.root / "samples" / f"{shard}.parquet"
    table = pq.read_table(path)
    table = table.set_column(table.schema.get_field_index("shard_url"), "shard_url",
                             pa.array([url] * table.num_rows, pa.string()))
    pq.write_table(table, path)


def test_typed_pipe_is_run_once_spooled_and_later_stages_read_the_copy(typed, tmp_path):
    root, command = typed
    ws = Workspace(root / "ws")
    spool = ws.root / "sources" / "a.tar"
    # one pass: the copy holds the bytes ingest read, up to the tar's end (the rest is zero padding)
    copied, original = spool.read_bytes(), (root / "a.tar").read_bytes()
    assert original.startswith(copied) and not original[len(copied):].strip(b"\0")
    assert same_samples(spool, root / "a.tar")
    record = pq.read_table(ws.root / "shards" / "a.parquet").to_pylist()[0]
    assert (record["shard_url"], record["shard_origin"]) == (str(spool), command)
    urls = set(pq.read_table(ws.root / "samples" / "a.parquet")["shard_url"].to_pylist())
    assert urls == {str(spool)}  # no command left in `samples`
    assert (root / "runs.log").read_text() == "run\n"

    (root / "a.tar").write_bytes(b"gone")  # the command would now give garbage: select must not run it
    done = run_cli("select", "-w", str(ws.root), "--name", "all", "--sql", "SELECT sample_id FROM candidates")
    assert done.returncode == 0, done.stderr
    assert json.loads((ws.root / "selections" / "all" / "manifest.json").read_text())["total"] == 7
    assert (root / "runs.log").read_text() == "run\n"  # ingest ran the command once; select never


def test_rerun_skips_and_a_lost_copy_is_made_again(typed, tmp_path):
    """A committed pipe: shard is skipped (the command does not run); if its copy is gone (a
    workspace ingested before copies existed), ingest runs the typed command again and copies it."""
    ws = copy_workspace(typed, tmp_path / "ws")
    log, source = tmp_path / "runs.log", tmp_path / "c.tar"  # shard "a" is taken by the typed command
    write_tar(source, shard_samples("c", 4, 0))
    spec = f"pipe:echo run >> {log}; cat {source}"
    first = ingest(ws, [spec], workers=1, progress=False)
    again = ingest(ws, [spec], workers=1, progress=False)
    assert (first.skipped, again.skipped, log.read_text()) == (0, 1, "run\n")
    (ws.root / "sources" / "c.tar").unlink()
    redo = ingest(ws, [spec], workers=1, progress=False)
    assert (redo.skipped, log.read_text()) == (0, "run\nrun\n")
    assert same_samples(ws.root / "sources" / "c.tar", source)


def test_another_command_under_a_taken_name_is_refused_unrun(typed, tmp_path):
    """Shard "a" came from one typed command; another command whose shard is also named "a" is
    refused (WouldOverwrite names --source) and never runs."""
    ws = copy_workspace(typed, tmp_path / "ws")
    marker, source = tmp_path / "ran", tmp_path / "a.tar"
    write_tar(source, shard_samples("x", 2, 50))
    summary = ingest(ws, [f"pipe:touch {marker}; cat {source}"], workers=1, progress=False)
    assert not summary.shards and "--source" in next(iter(summary.failed.values()))
    assert not marker.exists()


def test_a_failing_typed_command_leaves_no_copy(typed, tmp_path):
    ws = copy_workspace(typed, tmp_path / "ws")
    summary = ingest(ws, [f"pipe:cat {tmp_path / 'missing-c.tar'}"], workers=1, progress=False)
    assert list(summary.failed) and not list((ws.root / "sources").glob("*c.tar*"))
    assert not (ws.root / "samples" / "missing-c.parquet").exists()


def test_stored_urls_are_refused_with_one_line(tmp_path):
    marker = tmp_path / "MARKER"
    for url in pipe_variants(marker) + other_variants(tmp_path):
        with pytest.raises(UnsafeShardURL) as refused:
            open_stored_shard(url)
        assert "\n" not in str(refused.value) and "refusing the stored shard URL" in str(refused.value)
    assert not marker.exists()


@pytest.mark.parametrize("variant", range(10))
def test_select_never_runs_a_planted_command(typed, tmp_path, capsys, variant):
    ws = copy_workspace(typed, tmp_path / "ws")
    marker = tmp_path / "MARKER"
    plant(ws, "b", pipe_variants(marker)[variant])
    rc = main(["select", "-w", str(ws.root), "--name", "evil", "--sql", "SELECT sample_id FROM candidates"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "refusing the stored shard URL" in err, err
    assert not marker.exists() and not (ws.root / "selections" / "evil").exists()
    assert (typed[0] / "runs.log").read_text() == "run\n"  # the typed command did not run either


def test_select_refuses_urls_that_would_block_or_reach_elsewhere(typed, tmp_path, capsys):
    ws = copy_workspace(typed, tmp_path / "ws")
    for url in other_variants(tmp_path):
        plant(ws, "b", url)
        rc = main(["select", "-w", str(ws.root), "--name", "evil", "--sql", "SELECT sample_id FROM candidates"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and "refusing the stored shard URL" in err, (url, err)
    assert not (ws.root / "selections" / "evil").exists()


def test_embedding_and_dup_checks_flag_the_planted_shard_and_go_on(typed, tmp_path):
    """Decoding for embed / score / synthesize (load_images) and the near-duplicate pixel check
    (load_thumbnails): the planted shard's rows are flagged, the other shard is read in full."""
    ws = copy_workspace(typed, tmp_path / "ws")
    marker = tmp_path / "MARKER"
    for url in pipe_variants(marker) + other_variants(tmp_path):
        plant(ws, "b", url)
        jobs = shard_jobs(ws)
        ok = {}
        for job_idx, rows, _, flags in load_images(jobs, lambda im: torch.zeros(3, 4, 4), batch_size=64, workers=0,
                                                   progress=False):
            for j, r, f in zip(job_idx.tolist(), rows.tolist(), flags.tolist()):
                ok[(jobs[j].shard, r)] = f
        assert [k for k, f in ok.items() if f] == [("a", r) for r in range(4)], url
        assert not any(f for (shard, _), f in ok.items() if shard == "b") and len(ok) == 7

        located = [(row["shard_url"], row["key"], row["ext"])
                   for shard in ("a", "b")
                   for row in pq.read_table(ws.root / "samples" / f"{shard}.parquet").to_pylist()]
        _, seen = load_thumbnails(located)
        assert seen.tolist() == [True] * 4 + [False] * 3, url
    assert not marker.exists()


def write_selection(folder: Path) -> Path:
    """Curated shards + manifest.json as `webdistill select` writes them (plain file names)."""
    folder.mkdir(parents=True)
    write_tar(folder / "sel-000000.tar", shard_samples("s", 2, 20))
    manifest = {"name": folder.name, "total": 2, "num_classes": 2, "classes": ["x", "y"],
                "shards": [{"path": "sel-000000.tar", "count": 2,
                            "sha256": hashlib.sha256((folder / "sel-000000.tar").read_bytes()).hexdigest()}]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder / "manifest.json"


def test_manifest_shard_paths_are_files_in_its_folder(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    outside = tmp_path / "outside.tar"
    write_tar(outside, shard_samples("o", 1, 30))
    good = write_selection(tmp_path / "ws" / "selections" / "good")
    assert [s.url for s in load_manifest(good).shards] == [str(good.parent.resolve() / "sel-000000.tar")]

    (good.parent / "link.tar").symlink_to(outside)
    escaping = ["../../../outside.tar", "sub/../../../../outside.tar", str(outside), "link.tar",
                f"file://{outside}", "http://127.0.0.1:9/x.tar", "gs://bucket/x.tar", ""]
    for path in pipe_variants(marker) + escaping:
        manifest = json.loads(good.read_text())
        manifest["shards"].append({"path": path, "count": 1})
        evil = tmp_path / "evil" / "manifest.json"
        evil.parent.mkdir(exist_ok=True)
        (evil.parent / "link.tar").unlink(missing_ok=True)
        (evil.parent / "link.tar").symlink_to(outside)
        shutil.copy(good.parent / "sel-000000.tar", evil.parent)
        evil.write_text(json.dumps(manifest))
        with pytest.raises(DataError) as refused:
            load_manifest(evil)
        assert "\n" not in str(refused.value) and "manifest" in str(refused.value), path
    assert not marker.exists()

    # through the CLI: one line, nothing trained, nothing run
    ws = Workspace(tmp_path / "ws")
    planted = write_selection(ws.root / "selections" / "planted")
    manifest = json.loads(planted.read_text())
    manifest["shards"][0]["path"] = f"pipe:touch {shlex.quote(str(marker))}"
    planted.write_text(json.dumps(manifest))
    rc = main(["distill", "-w", str(ws.root), "--selection", "planted", "--student", "tiny_cnn", "--epochs", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "refused" in err, err
    assert not marker.exists() and not (ws.root / "students" / "planted" / "checkpoint.pt").exists()


def test_eval_shards_typed_by_the_user_may_still_be_a_command(tmp_path):
    """The rule is about who wrote the URL: a user-typed --eval spec stays a WebDataset spec."""
    from distill.data import Preprocess, eval_batches

    tar = write_tar(tmp_path / "eval.tar", [{"__key__": f"e{i}", "png": encode(noise_image(i, (8, 8)), "PNG"),
                                             "cls": str(i % 2)} for i in range(3)])
    prep = Preprocess(8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    batches = list(eval_batches(f"pipe:cat {tar}", prep, batch_size=4))
    assert [tuple(x.shape) for x, _ in batches] == [(3, 3, 8, 8)] and batches[0][1].tolist() == [0, 1, 0]
    assert np.isfinite(batches[0][0].numpy()).all()
