"""`score --name N` when N is taken: another teacher, student or setting is refused unless --overwrite
(selections read a run by name); the same run (a rerun, one after a crash, other machine settings, the
same teacher moved) resumes and skips its unchanged shards."""
import json
import shutil

import pytest

from curation.errors import WouldOverwrite
from curation.ingest import ingest
from curation.score import ScoreConfig, claim_run, score, score_pass1
from curation.shard_reader import shard_jobs
from curation.workspace import Workspace
from flows.cli import main
from flows.stage_runner import run_score

TEACHER = "tests.models_for_tests:thumbnail"  # the tests' own module: trusted
OTHER = "distill.models:tiny_student"


def config(**kw) -> ScoreConfig:
    return ScoreConfig(**({"teacher": TEACHER, "name": "run", "batch_size": 128, "workers": 0, "odin": False,
                           "trust_model_code": True} | kw))


@pytest.fixture(scope="module")
def scored_once(small_crawl, tmp_path_factory) -> Workspace:
    ws = Workspace(tmp_path_factory.mktemp("scored") / "ws")
    ingest(ws, [str(small_crawl / "crawl")], workers=1, progress=False)
    score(ws, config(), progress=False)
    return ws


@pytest.fixture
def scored(scored_once, tmp_path) -> Workspace:
    """A workspace with the small crawl scored once as `run` (3 shards), for this test alone."""
    return Workspace(shutil.copytree(scored_once.root, tmp_path / "ws", symlinks=True))


def _files(ws: Workspace) -> dict[str, bytes]:
    run = ws.root / "scores" / "run"
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


ANOTHER_RUN = {  # what changes, and how the refusal names it
    "teacher": ({"teacher": OTHER}, "teacher 'tests.models_for_tests:thumbnail' -> 'distill.models:tiny_student'"),
    "a student": ({"student": OTHER}, "student None -> 'distill.models:tiny_student'"),
    "a pass-1 setting": ({"odin": True}, "odin False -> True"),
    "a pass-2 setting": ({"kd3_tau": 0.5}, "kd3_tau 0.95 -> 0.5"),
    "the reference set": ({"reference": "confidence"}, "reference 'agreement' -> 'confidence'"),
}


@pytest.mark.parametrize("case", ANOTHER_RUN)
def test_another_run_under_a_taken_name_is_refused_before_any_work_unless_overwrite(scored, case):
    change, named = ANOTHER_RUN[case]
    before = _files(scored)
    for attempt in (lambda: run_score(scored, config(**change)), lambda: score(scored, config(**change),
                                                                                progress=False)):
        with pytest.raises(WouldOverwrite, match=rf"scoring run 'run' exists.*{named}.*--overwrite"):
            attempt()
        assert _files(scored) == before  # not one file touched, not even the name's owner
    replaced = run_score(scored, config(**change), overwrite=True)
    assert replaced["samples"] > 0 or change.keys() <= {"kd3_tau", "reference"}  # pass 2 alone redone
    stored = json.loads((scored.root / "scores" / "run" / "run.json").read_text())["config"]
    assert all(stored[k] == v for k, v in change.items())
    assert run_score(scored, config(**change))["skipped"] == 3  # the new owner resumes without --overwrite
    with pytest.raises(WouldOverwrite):  # and the old config is now the other one
        run_score(scored, config())


@pytest.mark.parametrize("how_it_runs", [{}, {"batch_size": 7}, {"workers": 1}, {"device": "cpu", "batch_size": 64}])
def test_the_same_run_resumes_whatever_machine_settings(scored, how_it_runs):
    again = run_score(scored, config(**how_it_runs))
    assert (again["scored"], again["skipped"]) == (0, 3)


def test_a_run_killed_after_its_first_shard_resumes_without_overwrite(small_crawl, tmp_path):
    ws = Workspace(tmp_path / "ws")
    ingest(ws, [str(small_crawl / "crawl")], workers=1, progress=False)
    claim_run(ws, config(odin=True))  # what a run does first; then it dies after one shard
    done = score_pass1(ws, config(odin=True), progress=False, only=[shard_jobs(ws)[0].shard])
    assert len(done.scored) == 1 and not (ws.root / "scores" / "run" / "run.json").exists()
    resumed = run_score(ws, config(odin=True))
    assert (resumed["skipped"], resumed["scored"]) == (1, 2)
    with pytest.raises(WouldOverwrite, match="odin True -> False"):
        run_score(ws, config(odin=False))


@pytest.mark.parametrize("bad_teacher", ["missing/teacher.json", "tests.models_for_tests:no_such_factory",
                                         "distill.models:tiny_student:extra"])
def test_a_run_that_failed_before_its_first_shard_holds_the_name_for_no_one(small_crawl, tmp_path, bad_teacher):
    """A bad teacher file or spec fails before any shard: the next run under that name, with any teacher,
    is not refused (only a run that scored something owns its name)."""
    ws = Workspace(tmp_path / "ws")
    ingest(ws, [str(small_crawl / "crawl")], workers=1, progress=False)
    with pytest.raises(Exception) as failed:
        score(ws, config(teacher=bad_teacher), progress=False)
    assert not isinstance(failed.value, WouldOverwrite)
    assert len(score(ws, config(), progress=False).scored) == 3


def test_the_same_teacher_moved_is_the_same_run(small_crawl, small_teacher, tmp_path):
    ws = Workspace(tmp_path / "ws")
    ingest(ws, [str(small_crawl / "crawl")], workers=1, progress=False)
    run_score(ws, config(teacher=str(small_teacher)))
    moved = shutil.copytree(small_teacher.parent, tmp_path / "elsewhere") / small_teacher.name
    assert run_score(ws, config(teacher=str(moved)))["skipped"] == 3
    weights = moved.parent / "teacher.pt"
    weights.write_bytes(weights.read_bytes() + b"\0")  # retrained in place: other files, another run
    with pytest.raises(WouldOverwrite, match="the teacher's or student's files"):
        claim_run(ws, config(teacher=str(moved)))


def test_a_finished_run_from_before_owner_files_is_judged_by_its_config(scored):
    run = scored.root / "scores" / "run"
    (run / "owner.json").unlink()
    record = json.loads((run / "run.json").read_text())
    del record["identity"]  # as runs recorded before identities were
    (run / "run.json").write_text(json.dumps(record))
    with pytest.raises(WouldOverwrite, match="teacher"):
        claim_run(scored, config(teacher=OTHER))
    assert run_score(scored, config(batch_size=32))["skipped"] == 3


def test_the_cli_refuses_in_one_line_and_overwrite_replaces(scored, capsys):
    args = ["score", "-w", str(scored.root), "--teacher", OTHER, "--name", "run", "--no-odin", "--workers", "0",
            "--trust-model-code"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'run' exists" in err and "--overwrite" in err
    assert main([*args, "--overwrite"]) == 0
    assert "3 shard(s)" in capsys.readouterr().out
