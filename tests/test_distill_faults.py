"""Faults in the distillation job (issue 11, items 1 and 5): what a failed job leaves behind, a rank
killed mid-run, and a rank that hangs.

- Every attempt's output goes to `<out>/job.log`, streamed or not, bounded; a failed job's error
  carries its reason line and its last lines.
- A rank killed with SIGKILL fails the job with a line naming it; the rerun resumes from the last
  checkpoint and ends where an uninterrupted run ends (the "exact resume" of distill/train.py).
- A rank stopped with SIGSTOP is caught by the collective timeout (`collective_timeout_s`): the job
  fails in bounded time with one line, and no rank is left behind.

Real torchrun, gloo, DDP and DataLoader workers throughout, on a 400-sample selection.
"""
import io
import json
import os
import re
import signal
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from distill.config import write_config
from distill.data import Preprocess
from distill.joblog import JOB_LOG, JobLog
from distill.launch import DistillJobError, failure_reason, launch
from distill.students import build_student
from distill.train import Dist, evaluate, peer_failure
from tests.test_train import colour_images, encode, write_selection

STEPS = 2 * (400 // 2 // 16)  # epochs x (samples // ranks // batch size)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """A selection with stored logits (a noisy one-hot of the true class: no teacher needed) and a
    labelled eval set."""
    root = tmp_path_factory.mktemp("distill-faults")
    pool, labels = colour_images(400, seed=2)
    logits = np.eye(10)[labels] * 5 + np.random.default_rng(0).normal(0, 1, (400, 10))
    manifest = write_selection(root / "selection", pool, logits, [170, 150, 80])
    ev, ev_labels = colour_images(100, seed=3)
    with wds.TarWriter(str(root / "eval.tar")) as sink:
        for i in range(len(ev)):
            sink.write({"__key__": f"e{i:04d}", "png": encode(ev[i], "png"), "cls": str(int(ev_labels[i]))})
    return {"root": root, "manifest": manifest, "eval": str(root / "eval.tar")}


def job_config(data: dict, out: Path, **over) -> Path:
    cfg = {"selection": str(data["manifest"]), "student": "tiny_cnn", "loss": {"method": "kd", "T": 2.0},
           "epochs": 2, "batch_size": 16, "optimizer": "adamw", "lr": 5e-3, "weight_decay": 0.0, "workers": 1,
           "shuffle_buffer": 100, "eval": data["eval"], "out": str(out), "checkpoint_every": 4, "log_every": 1,
           "progress": False, "seed": 3, "threads": 1, **over}
    out.mkdir(parents=True, exist_ok=True)
    return write_config(cfg, out.parent / f"{out.name}.json")


def read_proc(path: str) -> bytes:
    """A /proc file, or nothing when its process or thread has just gone."""
    try:
        return Path(path).read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return b""


def children(pid: int) -> list[int]:
    """Every thread's children: launch() starts torchrun from a thread of this process."""
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in read_proc(f"{task}/children").split()]


def alive(pid: int) -> bool:
    """Running or stopped (a zombie waiting for its parent counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class Background:
    """launch() in a thread, so that the test can hurt the job while it runs."""

    def __init__(self, config: Path, **kw):
        self.config, self.result, self.error = config, None, None
        self.thread = threading.Thread(target=self._run, kwargs=kw, daemon=True)
        self.thread.start()

    def _run(self, **kw):
        try:
            self.result = launch(self.config, nproc=2, stream=None, **kw)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc

    def ranks(self) -> dict[int, int]:
        """{rank: pid} of the job's ranks (the children of its torchrun, which is a child of this process)."""
        for pid in children(os.getpid()):
            if str(self.config) in read_proc(f"/proc/{pid}/cmdline").decode(errors="replace"):
                found = {}
                for rank_pid in children(pid):
                    env = read_proc(f"/proc/{rank_pid}/environ").split(b"\0")
                    rank = next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)
                    if rank is not None:
                        found[rank] = rank_pid
                return found
        return {}


def wait_for_checkpoint(job: Background, out: Path, timeout: float = 180) -> dict[int, int]:
    deadline = time.monotonic() + timeout
    while not (out / "checkpoint.pt").is_file():
        assert job.thread.is_alive() and time.monotonic() < deadline, f"no checkpoint: {job.error}"
        time.sleep(0.02)
    ranks = job.ranks()
    assert sorted(ranks) == [0, 1], (ranks, job.error)
    return ranks


def loss_lines(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


# -- job.log ---------------------------------------------------------------------------------------
def test_job_log_appends_every_attempt_and_stays_bounded(tmp_path):
    for attempt in (1, 2):
        log = JobLog(tmp_path, ["torchrun", "x y"], cap=1000, tail_bytes=300)
        for i in range(500):  # 500 lines of ~20 bytes: far over the cap
            log.write(f"attempt {attempt} line {i:04d}\n".encode())
        log.close(1)
    text = (tmp_path / JOB_LOG).read_text()
    rotated = (tmp_path / (JOB_LOG + ".1")).read_text()
    # attempt 1 went over the cap, so attempt 2 moved it aside: each file holds one attempt
    assert rotated.startswith("==== ") and " attempt 1: torchrun 'x y'\n" in rotated.splitlines()[0] + "\n"
    assert text.splitlines()[0].endswith(" attempt 2: torchrun 'x y'")
    for body, attempt in ((rotated, 1), (text, 2)):
        assert len(body) < 1000 + 300 + 200  # the cap, the kept end, the header and the markers
        assert f"attempt {attempt} line 0000" in body and f"attempt {attempt} line 0499" in body
        assert f"attempt {attempt} line 0250" not in body  # the middle was left out, and it says so
        assert "bytes left out ...]" in body and body.rstrip().endswith("==== exit code 1")
    log = JobLog(tmp_path, ["torchrun"], cap=1000)  # a third attempt: numbered after the rotated file's
    log.close(None)
    assert " attempt 3: torchrun" in (tmp_path / JOB_LOG).read_text()


def test_job_log_writes_through_no_planted_link(tmp_path):
    """A run folder from elsewhere with job.log (or job.log.1) linked to a file outside: the link is
    replaced, the file outside is untouched."""
    outside = tmp_path / "outside.txt"
    for name in (JOB_LOG, JOB_LOG + ".1"):
        outside.write_text("keep me\n")
        run = tmp_path / name.replace(".", "-")
        run.mkdir()
        (run / name).symlink_to(outside)
        log = JobLog(run, ["torchrun"], cap=10)
        log.write(b"x" * 100)
        log.close(0)
        log = JobLog(run, ["torchrun"], cap=10)  # over the cap: rotates onto job.log.1
        log.close(0)
        assert outside.read_text() == "keep me\n"
        assert not (run / JOB_LOG).is_symlink() and not (run / (JOB_LOG + ".1")).is_symlink()
        assert "x" * 10 in (run / (JOB_LOG + ".1")).read_text()


def test_only_a_lost_or_silent_peer_becomes_one_line():
    """gloo's errors, as torch raises them (plain RuntimeErrors), and errors that are a rank's own bug."""
    d = Dist(rank=1, world=2, timeout_s=7)
    timeout = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out "
                           "waiting 7000ms for recv operation to complete")
    reset = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:33962: "
                         "Connection reset by peer. This is typically caused by a remote worker hanging or bugs")
    assert str(peer_failure(timeout, d)).startswith("rank 1 waited 7 s for the other ranks (config key "
                                                    "'collective_timeout_s')")
    assert str(peer_failure(reset, d)) == ("rank 1 lost another rank (Read error [127.0.0.1]:33962: Connection reset "
                                           "by peer): it died or was killed; rerun to resume from the last checkpoint")
    for own_bug in ("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x2)",
                    "ProcessGroupGloo::allreduce: invalid tensor type", "peer of nothing"):
        assert peer_failure(RuntimeError(own_bug), d) is None


def test_failure_reason_names_the_killed_rank_before_any_error_line():
    torchrun_tail = ("distill: error: rank 0 lost another rank (Connection closed by peer [127.0.0.1]:1): it died\n"
                     "Root Cause (first observed failure):\n[0]:\n  time      : 2026-12-01_02:05:59\n"
                     "  host      : localhost\n  rank      : 1 (local_rank: 1)\n"
                     "  exitcode  : -9 (pid: 16061)  (SIGKILL)\n  error_file: <N/A>\n")
    assert failure_reason(1, torchrun_tail) == "the distillation job failed: rank 1 was killed by SIGKILL"
    assert failure_reason(1, torchrun_tail.replace("-9 (pid: 16061)  (SIGKILL)", "2 (pid: 16061)")).startswith(
        "rank 0 lost another rank")
    crash = "Traceback (most recent call last):\n  File x\nRuntimeError: boom\n" + torchrun_tail.split("\n", 1)[1]
    assert failure_reason(1, crash.replace("-9 (pid: 16061)  (SIGKILL)", "1 (pid: 16061)")) == (
        "the distillation job failed: rank 1 exited with code 1: RuntimeError: boom")
    assert failure_reason(3, "nothing useful") == "the distillation job failed (exit code 3)"


@pytest.mark.parametrize("between", ["", "\n", " [rank1]: ", "\r"])
def test_two_ranks_error_lines_that_ran_together_give_one_reason(between):
    """Ranks write to torchrun's one pipe; should two of their lines run together, the reason is still
    the first line alone (CI once saw "...checkpoint.ptdistill: interrupted: ...")."""
    line = "distill: interrupted: stopped at step 4; checkpoint in /w/students/a/checkpoint.pt"
    text = f"noise\n{line}{between}{line.replace('step 4', 'step 5')}\n\n"
    assert failure_reason(130, text) == line and "step 5" not in failure_reason(130, text)


@pytest.mark.slow  # torchrun
def test_a_failed_pipeline_job_leaves_its_output_and_its_last_lines_in_the_error(data, tmp_path):
    """The pipeline's distill step (run_distill, which the Prefect task wraps; stream=None: nothing
    on a console) on a selection whose first sample is fine (the up-front check passes) and whose other
    images are not images: the job fails inside a DataLoader worker."""
    from flows.stage_runner import run_distill

    manifest = json.loads(data["manifest"].read_text())
    bad = tmp_path / "ws" / "selections" / "bad"
    bad.mkdir(parents=True)
    with tarfile.open(data["manifest"].parent / "00000.tar") as tin, tarfile.open(bad / "00000.tar", "w") as tout:
        for member in tin.getmembers():
            payload = tin.extractfile(member).read()
            key, ext = member.name.split(".", 1)
            if key != "s00000" and ext in ("png", "jpg", "webp"):
                payload = b"this is not an image"
                member.size = len(payload)
            tout.addfile(member, io.BytesIO(payload))
    manifest["shards"] = [dict(manifest["shards"][0], path="00000.tar", count=170)]
    manifest["total"] = 170
    (bad / "manifest.json").write_text(json.dumps(manifest))
    options = {k: v for k, v in json.loads(job_config(data, tmp_path / "unused").read_text()).items()
               if k not in ("selection", "out", "name")}
    with pytest.raises(DistillJobError) as caught:
        run_distill(str(tmp_path / "ws"), "bad-run", "bad", {**options, "nproc": 2, "samples_per_epoch": 64})
    err, out = caught.value, tmp_path / "ws" / "students" / "bad-run"
    first, *rest = str(err).splitlines()
    assert re.search(r"00000\.tar: sample s\d{5}: cannot decode its (png|jpg|webp): ", first), first
    assert err.log == out / JOB_LOG and first.endswith(f" (the job's output: {out / JOB_LOG})")
    assert rest[0] == "its last lines:"
    assert 5 <= len(err.tail) <= 20 and rest[1:] == [f"  | {line}" for line in err.tail]
    log = err.log.read_text()
    assert log.splitlines()[0].startswith("==== ") and "attempt 1: " in log.splitlines()[0]
    assert "torch.distributed.run" in log.splitlines()[0] and str(out / "job.json") in log.splitlines()[0]
    assert "distill: error: " in log and "cannot decode its" in log and log.rstrip().endswith("==== exit code 1")
    assert all(line in log for line in err.tail)  # the tail is the end of what the log holds


# -- a rank killed, a rank hung -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(data) -> dict:
    out = data["root"] / "reference"
    summary = launch(job_config(data, out), nproc=2, stream=None)
    assert summary["steps"] == STEPS and (out / JOB_LOG).read_text().rstrip().endswith("==== exit code 0")
    # the ranks share the evaluation; what it measures is still the exported student (rank 0's buffers)
    student = build_student("tiny_cnn", 10)
    student.load_state_dict(torch.load(out / "student.pt", weights_only=True))
    prep = Preprocess(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert evaluate(student, data["eval"], prep, 32, Dist()) == (summary["eval_accuracy"], 100)
    return {"out": out, "summary": summary}


@pytest.mark.slow  # torchrun
def test_a_killed_rank_fails_the_job_and_the_rerun_resumes_exactly(data, reference):
    out = data["root"] / "killed"
    config = job_config(data, out)
    job = Background(config)
    ranks = wait_for_checkpoint(job, out)
    # rank 1's DataLoader workers come from its forkserver, not from a fork of the multi-threaded rank
    (server,) = [pid for pid in children(ranks[1])
                 if b"multiprocessing.forkserver" in read_proc(f"/proc/{pid}/cmdline")]
    workers = children(server)
    assert workers and not set(workers) & set(children(ranks[1]))
    os.kill(ranks[1], signal.SIGKILL)
    job.thread.join(120)
    assert not job.thread.is_alive() and isinstance(job.error, DistillJobError)
    assert not any(alive(pid) for pid in [server, *workers])  # gone with their rank, not orphaned
    first = str(job.error).splitlines()[0]
    assert first == f"the distillation job failed: rank 1 was killed by SIGKILL (the job's output: {out / JOB_LOG})"
    assert job.error.tail and "SIGKILL" in "\n".join(job.error.tail)  # torchrun's summary, in the error
    assert not any(alive(pid) for pid in ranks.values())
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert 0 < ckpt["global_step"] < STEPS and not (out / "summary.json").exists()

    summary = launch(config, nproc=2, stream=None)
    assert summary["resumed_from_step"] == ckpt["global_step"] and summary["steps"] == STEPS
    # the exact resume train.py promises: the loss trajectory, the eval and the student of an
    # uninterrupted run
    want, got = loss_lines(reference["out"]), loss_lines(out)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
    for key in ("loss", "lr"):
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in want], rtol=1e-5, atol=1e-7)
    assert summary["eval_accuracy"] == reference["summary"]["eval_accuracy"]
    a = torch.load(out / "student.pt", weights_only=True)
    b = torch.load(reference["out"] / "student.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    headers = [line for line in (out / JOB_LOG).read_text().splitlines()
               if line.startswith("==== ") and "attempt" in line]
    assert len(headers) == 2  # the killed attempt and the rerun, one log


@pytest.mark.slow  # torchrun
def test_sigterm_to_torchrun_checkpoints_and_stops(data):
    """A scheduler stopping the job: torchrun passes SIGTERM to each rank's whole process group. The
    ranks stop at the next step with a checkpoint there; their DataLoader workers, out of that group,
    are not killed under them (which used to crash the ranks with "DataLoader worker ... killed")."""
    out = data["root"] / "sigterm"
    config = job_config(data, out, checkpoint_every=1000)  # the epoch ends and the stop are the only ones
    job = Background(config)
    deadline = time.monotonic() + 180
    while len(loss_lines(out) if (out / "metrics.jsonl").is_file() else []) < 3:
        assert job.thread.is_alive() and time.monotonic() < deadline, job.error
        time.sleep(0.02)
    ranks = job.ranks()
    torchrun = next(pid for pid in children(os.getpid()) if str(config) in read_proc(f"/proc/{pid}/cmdline").decode())
    os.kill(torchrun, signal.SIGTERM)
    job.thread.join(90)
    assert not job.thread.is_alive() and isinstance(job.error, DistillJobError)
    first = str(job.error).splitlines()[0]
    checkpoint = out / "checkpoint.pt"
    match = re.fullmatch(rf"distill: interrupted: stopped at step (\d+); checkpoint in {checkpoint} .*", first)
    assert match, first
    log = (out / JOB_LOG).read_text()
    assert "killed by signal" not in log and not re.search(r"\[rank\d\]: Traceback", log)  # no rank crashed
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["global_step"] == int(match.group(1)) >= 3 and ckpt["global_step"] % (STEPS // 2) != 0
    assert not any(alive(pid) for pid in ranks.values())


@pytest.mark.slow  # torchrun
def test_a_hung_rank_is_caught_by_the_collective_timeout(data):
    out = data["root"] / "hung"
    config = job_config(data, out, collective_timeout_s=5)
    job = Background(config)
    ranks = wait_for_checkpoint(job, out)
    try:
        os.kill(ranks[1], signal.SIGSTOP)
        stopped = time.monotonic()
        job.thread.join(90)
        took = time.monotonic() - stopped
        assert not job.thread.is_alive(), "the job did not fail within 90 s of a rank hanging"
    finally:
        for pid in filter(alive, ranks.values()):
            os.kill(pid, signal.SIGKILL)
    assert isinstance(job.error, DistillJobError)
    first = str(job.error).splitlines()[0]
    assert first.startswith("rank 0 waited 5 s for the other ranks (config key 'collective_timeout_s')"), first
    assert first.endswith(f"(the job's output: {out / JOB_LOG})")
    # rank 0 times out after 5 s and exits; torchrun then SIGTERMs the stopped rank's process group and
    # SIGKILLs it 30 s later (its fixed grace); the rest is slack for 2 busy cores
    assert 5 <= took < 75
    assert not any(alive(pid) for pid in ranks.values())  # the stopped rank was killed, not left behind
    assert "distill: error: " + first.split(" (the job's output")[0] in (out / JOB_LOG).read_text()
