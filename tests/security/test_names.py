"""Names that become paths: every verb that takes a name (selection, synthetic set, scoring run,
student, knn score, embedder, ingest source) and the pipeline YAML's name refuse anything that is not
one plain folder name, and a symlink planted in the workspace never redirects a write or a delete
outside. Each refusal is exit code 2 with one stderr line, and leaves a marker outside, the workspace's
files and their hashes exactly as they were."""
import hashlib
import json
import shutil

import pytest

from curation.errors import UnsafeName
from curation.ingest import ingest
from curation.workspace import Workspace
from flows.cli import main

from ..conftest import encode, meta, noise_image, run_cli, write_tar

UNSAFE = ["..", ".", "../x", "../../x", "ABSOLUTE", "a/b", "", "a" * 300, "a\0b", "a\nb", "$(touch pwned)",
          "x;rm -rf y", "`id`", "-rf", "~", "*", " x", "x ", ".hidden", "é"]

# verb -> argv with NAME where the name goes ("=" form: a name may start with '-')
VERBS = {
    "ingest --source": ["ingest", "SHARD", "--workers=1", "--source=NAME"],
    "select --name": ["select", "--name=NAME", "--policy=topk:k=1;by=msp"],
    "select --synthetic": ["select", "--name=ok", "--policy=topk:k=1;by=msp", "--synthetic=NAME"],
    "score --name": ["score", "--teacher=distill.models:tiny_student", "--device=cpu", "--name=NAME"],
    "synthesize --name": ["synthesize", "--teacher=distill.models:tiny_student", "--name=NAME"],
    "synthesize --score-run": ["synthesize", "--teacher=distill.models:tiny_student", "--name=ok", "--score-run=NAME"],
    "distill --name": ["distill", "--selection=s1", "--student=tiny_cnn", "--name=NAME"],
    "distill --selection": ["distill", "--selection=NAME", "--student=tiny_cnn"],
    "knn-score --name": ["knn-score", "--embedder=teacher", "--name=NAME", "--prompts", "a digit"],
    "knn-score --embedder": ["knn-score", "--embedder=NAME", "--name=ok", "--prompts", "a digit"],
    "index --embedder": ["index", "--embedder=NAME"],
    "knn --embedder": ["knn", "--embedder=NAME", "--sample-id", "x"],
}


def snapshot(folder) -> dict[str, str]:
    """Every file and symlink under `folder` with its content hash (or link target)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = "-> " + str(p.readlink())
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A workspace with one ingested shard and a (fake) selection `s1`, and a folder outside it."""
    root = tmp_path_factory.mktemp("names")
    shard = write_tar(root / "crawl" / "00000.tar", [
        {"__key__": f"k{i}", "png": encode(noise_image(i), "PNG"), "json": meta(f"k{i}")} for i in range(3)])
    ws = Workspace(root / "ws")
    ingest(ws, [str(shard)], workers=1, progress=False)
    (ws.root / "selections" / "s1").mkdir(parents=True)
    (ws.root / "selections" / "s1" / "manifest.json").write_text(json.dumps({"name": "s1", "total": 0, "shards": []}))
    return root, shard


@pytest.fixture()
def world(base, tmp_path):
    """A fresh copy of the base workspace, and `outside/` with a marker file."""
    root, shard = base
    ws = tmp_path / "ws"
    shutil.copytree(root / "ws", ws, symlinks=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "marker").write_text("must survive")
    return ws, shard, outside


def _argv(verb: str, name: str, ws, shard, outside) -> list[str]:
    name = str(outside / "x") if name == "ABSOLUTE" else name
    return [a.replace("NAME", name).replace("SHARD", str(shard)) for a in VERBS[verb][:1]] + ["-w", str(ws)] + \
        [a.replace("NAME", name).replace("SHARD", str(shard)) for a in VERBS[verb][1:]]


def _refused(argv, ws, outside, capsys, why=("is not allowed", "resolves outside")) -> str:
    before, outside_before = snapshot(ws), snapshot(outside)
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and any(w in err[0] for w in why), (argv, err)
    assert snapshot(ws) == before and snapshot(outside) == outside_before
    assert (outside / "marker").read_text() == "must survive"
    assert not (ws.parent / "pwned").exists() and not list(ws.parent.glob("x*"))
    return err[0]


@pytest.mark.parametrize("verb", list(VERBS))
def test_every_verb_refuses_every_unsafe_name(world, capsys, verb):
    ws, shard, outside = world
    for name in UNSAFE:
        if verb.endswith("--embedder") and name == "a/b":
            name = "open_clip:a/b"
        _refused(_argv(verb, name, ws, shard, outside), ws, outside, capsys)


def test_safe_names_still_pass_the_check(world, capsys):
    ws, shard, outside = world
    assert main(["ingest", "-w", str(ws), str(shard), "--workers=1", "--source=web.v2_crawl-1"]) == 0
    assert (ws / "samples" / "web.v2_crawl-1-00000.parquet").is_file()


@pytest.mark.parametrize("kind, name, argv", [
    ("selections", "x", ["select", "--name=x", "--policy=topk:k=1;by=msp"]),
    ("synthetic", "x", ["select", "--name=ok", "--policy=topk:k=1;by=msp", "--synthetic=x"]),
    ("students", "run", ["distill", "--selection=s1", "--student=tiny_cnn", "--name=run"]),
    ("scores", "r", ["score", "--teacher=distill.models:tiny_student", "--device=cpu", "--name=r"]),
    ("embeddings", "teacher", ["index", "--embedder=teacher"]),
    ("students", None, ["distill", "--selection=s1", "--student=tiny_cnn", "--name=run"]),
    ("scores", None, ["score", "--teacher=distill.models:tiny_student", "--device=cpu", "--name=r"]),
    ("selections", "s1", ["distill", "--selection=s1", "--student=tiny_cnn", "--name=run"]),
    # the catalog's compacted copy: every stage's refresh writes it through the same path
    ("compacted", None, ["refresh"]),
])
def test_a_planted_symlink_does_not_redirect_writes_or_deletes(world, capsys, kind, name, argv):
    ws, _, outside = world
    (outside / "manifest.json").write_text("{}")
    link = ws / kind / name if name else ws / kind
    if link.exists():
        shutil.rmtree(link)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside, target_is_directory=True)
    _refused([argv[0], "-w", str(ws), *argv[1:]], ws, outside, capsys, why=("resolves outside",))


def test_ingest_into_a_symlinked_samples_folder_writes_nothing_outside(world, capsys):
    ws, shard, outside = world
    shutil.rmtree(ws / "samples")
    (ws / "samples").symlink_to(outside, target_is_directory=True)
    before = snapshot(outside)
    assert main(["ingest", "-w", str(ws), str(shard), "--workers=1", "--source=fresh"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "resolves outside" in err[0]
    assert snapshot(outside) == before


def test_names_read_back_from_a_workspace_are_checked(world):
    """Stored names (a synthetic manifest's shard paths, a scoring run's folder, an embedder's folder)
    are checked as user-given ones are."""
    from curation.embedders import embedder_from_workspace
    from curation.score import read_run
    from curation.select import _mix_synthetic

    ws, _, outside = world
    w = Workspace(ws)
    (outside / "secret.tar").write_bytes(b"not for the selection")
    for listed in ("../../outside/secret.tar", str(outside / "secret.tar"), "a/../../../outside/secret.tar"):
        (ws / "synthetic" / "evil").mkdir(parents=True, exist_ok=True)
        (ws / "synthetic" / "evil" / "manifest.json").write_text(json.dumps(
            {"name": "evil", "total": 1, "counts_per_class": {"0": 1},
             "shards": [{"path": listed, "count": 1, "sha256": "0" * 64}]}))
        target = ws / "selections" / ".tmp-t"
        target.mkdir(parents=True, exist_ok=True)
        with pytest.raises(UnsafeName):
            _mix_synthetic(w, "evil", target)
        assert list(target.iterdir()) == []
    (ws / "synthetic" / "evil" / "x.tar").symlink_to(outside / "secret.tar")
    (ws / "synthetic" / "evil" / "manifest.json").write_text(json.dumps(
        {"name": "evil", "total": 1, "counts_per_class": {"0": 1},
         "shards": [{"path": "x.tar", "count": 1, "sha256": hashlib.sha256(b"not for the selection").hexdigest()}]}))
    with pytest.raises(UnsafeName, match="resolves outside"):
        _mix_synthetic(w, "evil", target)
    (ws / "scores").mkdir(exist_ok=True)
    (ws / "scores" / "evil").symlink_to(outside, target_is_directory=True)
    (outside / "run.json").write_text(json.dumps({"teacher": {"spec": "x"}}))
    with pytest.raises(UnsafeName):
        read_run(w, "evil")
    for name in ("../x", "open_clip:../../x", "/abs"):
        with pytest.raises(UnsafeName):
            embedder_from_workspace(ws, name)


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".", "x" * 125, "$(id)"])
def test_a_pipeline_name_that_is_not_a_plain_name_is_refused(tmp_path, name):
    """Every round's folders are named <name>-round<r>: the YAML's name is refused when it loads."""
    from flows.pipeline import PipelineConfigError, load_pipeline_config

    cfg = tmp_path / "p.yaml"
    cfg.write_text(json.dumps({"name": name, "rounds": 2, "workspace": "ws", "ingest": {"shards": ["crawl"]},
                               "score": {"teacher": "t.json"}, "select": {"policy": "dedup"},
                               "distill": {"student": "tiny_cnn"}}))
    with pytest.raises(PipelineConfigError, match="is not allowed") as err:
        load_pipeline_config(cfg)
    assert "\n" not in str(err.value) and "name:" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]


def test_as_a_user_distill_dotdot_and_ingest_source_outside_are_refused(world):
    """The two reproductions from the issue, run as a user would: `distill --name ..` deleted the
    whole workspace; `ingest --source ../../x` wrote parquet outside it."""
    ws, shard, outside = world
    before = snapshot(ws)
    for argv in (["distill", "-w", str(ws), "--selection", "s1", "--student", "tiny_cnn", "--name", ".."],
                 ["ingest", "-w", str(ws), str(shard), "--source", "../../x"]):  # (/abs: in-process above)
        proc = run_cli(*argv)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "is not allowed" in proc.stderr
        assert snapshot(ws) == before and (outside / "marker").read_text() == "must survive"
        assert not list(ws.parent.parent.glob("x*")) and not list(outside.glob("abs*"))
