"""Fault injection for every stage, shared by tests/test_faults.py (a few faults) and
bench/faults.py (many, counted).

What a fault is here, and what surviving it means:
- **SIGKILL** of a stage's whole process group (the CLI and its workers) at a random moment, then a
  rerun: the workspace must end exactly as after an uninterrupted run, compared by
  `workspace_digest`, and no temporary name a killed writer left may be read as output.
- **Two writers at once** on one workspace: both succeed, or one fails with one line; every view
  and table of the catalog still reads (`catalog_digest` opens them all).
- **A corrupt catalog** says it is corrupt and how to rebuild it, never "busy".
- **Disk full / no permission** while writing: one line naming the cause, no partial artifact, and
  a rerun once there is room gives the uninterrupted result.

The canonical digest of a workspace (`workspace_digest`), one entry per artifact:
- parquet: its rows as sorted JSON lines plus its key/value metadata, without TIMING columns/keys;
- json: the parsed document without TIMING keys;
- npy, faiss, tar and anything else: the file's bytes (`tar_members=True`: each member's name and
  bytes, sorted, for tars whose headers carry the time they were written, as the crawl's do);
- the catalog: every table and view as sorted JSON rows without TIMING columns; `runs`, the log of
  invocations, as its set of stages (a killed run is not an invocation that finished).
Absolute paths of the workspace itself are replaced by `<ws>`, so two copies compare equal.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.conftest import encode, noise_image  # noqa: E402

# Columns and keys that say when or how long, not what: they differ between any two runs.
TIMING = frozenset({"seconds", "ingested_at", "created_at", "started_at", "finished_at", "duration", "start_time",
                    "end_time"})
# Values computed from timing ones: a selection row's manifest_sha256 hashes a manifest that holds its
# created_at. `records_match_files` checks them against the files instead. A manifest's selection_hash
# hashes its scoring run's finished_at (so a re-scored pool re-selects); the ids and weights it also
# hashes are compared in members.parquet and the shards.
DERIVED = frozenset({"manifest_sha256", "selection_hash"})
# Names writers give unfinished files and folders (workspace.atomic_path, the selection swap).
TEMP_GLOBS = (".*.tmp", ".*.tmp.wal", ".tmp-*", ".old-*")
CATALOG_FILES = ("catalog.duckdb", "catalog.duckdb.wal")
# The catalog's compacted copies (curation/catalog_compact.py): stamped with their inputs' mtimes, and
# compared through the views that read them (`catalog_digest`), as catalog.duckdb is.
CATALOG_FOLDERS = ("compacted",)
STAGES = ("ingest", "embed", "index", "score", "synthesize", "select")  # in pipeline order; crawl stands apart


# --- running the CLI ---------------------------------------------------------------------------

def cli_env(**extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", PREFECT_SERVER_ANALYTICS_ENABLED="false",
                DO_NOT_TRACK="1", **extra)


def cli_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "flows.cli", *args]


def run_cli(args: list[str], timeout: float = 600, prefix: tuple[str, ...] = (),
            **popen) -> subprocess.CompletedProcess:
    """`webdistill ARGS` in a subprocess, as a user runs it (`prefix`: a wrapper such as setpriv)."""
    return subprocess.run([*prefix, *cli_cmd(args)], capture_output=True, text=True, cwd=ROOT, env=cli_env(),
                          timeout=timeout, **popen)


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs (zombies waiting for a reaper do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


@dataclass
class Killed:
    killed: bool  # False: the run finished before the kill was due
    returncode: int
    seconds: float
    work_seconds: float  # from its first write to its end (or the kill)
    stderr: str = ""


def _written_since(root: Path, since: float) -> bool:
    """Whether a file under `root` (temporaries included, the catalog aside) was written since `since`."""
    for folder, _, files in os.walk(root):
        for name in files:
            if name in CATALOG_FILES:
                continue
            try:
                if os.lstat(os.path.join(folder, name)).st_mtime >= since:
                    return True
            except OSError:  # a temporary renamed or removed meanwhile
                continue
    return False


def run_and_kill(args: list[str], root: Path | None, kill_after: float | None = None, timeout: float = 600) -> Killed:
    """Start `webdistill ARGS` in its own process group and watch `root` for its first write; SIGKILL the
    whole group `kill_after` s after it (None: let it finish). Anchored on the first write, not on the
    start, so that the kill lands mid-work however long the imports take on a loaded machine; with
    `root` None, on the start."""
    start_wall, start = time.time(), time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cli_cmd(args), cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
        first_write = start if root is None else None
        while proc.poll() is None and time.perf_counter() - start < timeout:
            if first_write is None and _written_since(root, start_wall):
                first_write = time.perf_counter()
            if first_write is not None and kill_after is not None and time.perf_counter() - first_write >= kill_after:
                break
            time.sleep(0.01)
        finished = proc.poll() is not None
        if not finished:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            deadline = time.monotonic() + 10
            while _group_alive(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        end = time.perf_counter()
        err.seek(0)
        return Killed(not finished and proc.returncode == -signal.SIGKILL, proc.returncode, end - start,
                      end - (first_write or end), err.read())


def one_line(stderr: str) -> list[str]:
    """The error lines of a run (progress bars and warnings aside)."""
    return [line for line in stderr.splitlines() if line.startswith("webdistill:")]


# --- the canonical digest ------------------------------------------------------------------------

def is_timing(key: str) -> bool:
    return key in TIMING or key in DERIVED or key.endswith("_seconds")


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if not is_timing(k)}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _rows_digest(rows: list[dict], root: Path, extra: object = None) -> str:
    lines = sorted(json.dumps(_strip(r), sort_keys=True, default=str) for r in rows)
    text = "\n".join(lines) + "\n" + json.dumps(_strip(extra), sort_keys=True, default=str)
    return hashlib.sha256(text.replace(str(root), "<ws>").encode()).hexdigest()


def _parquet_metadata(path: Path) -> dict:
    out = {}
    for k, v in (pq.read_schema(path).metadata or {}).items():
        if k.startswith(b"ARROW:") or k == b"pandas":
            continue
        try:
            out[k.decode()] = json.loads(v)
        except ValueError:
            out[k.decode()] = v.decode(errors="replace")
    return out


def _tar_members(path: Path) -> str:
    members = []
    with tarfile.open(path) as tar:
        for info in tar:
            data = tar.extractfile(info).read() if info.isfile() else b""
            members.append(f"{info.name} {hashlib.sha256(data).hexdigest()}")
    return hashlib.sha256("\n".join(sorted(members)).encode()).hexdigest()


def file_digest(path: Path, root: Path, tar_members: bool = False) -> str:
    if path.suffix == ".parquet":
        return _rows_digest(pq.read_table(path).to_pylist(), root, _parquet_metadata(path))
    if path.suffix == ".json":
        return _rows_digest([], root, json.loads(path.read_text()))
    if path.suffix == ".tar" and tar_members:
        return _tar_members(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def is_temporary(rel: Path) -> bool:
    return any(part != "." and any(Path(part).match(g) for g in TEMP_GLOBS) for part in rel.parts)


def leftovers(root: Path) -> list[str]:
    """Temporary names left anywhere under `root` (files or folders)."""
    found = set()
    for g in TEMP_GLOBS:
        found.update(str(p.relative_to(root)) for p in root.rglob(g))
    return sorted(found)


def tree_digest(root: Path, tar_members: bool = False) -> dict[str, str]:
    """Digest of every finished artifact under `root` (temporaries and the catalog file aside)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if (path.is_file() and str(rel) not in CATALOG_FILES and rel.parts[0] not in CATALOG_FOLDERS
                and not is_temporary(rel)):
            out[str(rel)] = file_digest(path, root, tar_members)
    return out


def catalog_digest(root: Path) -> dict[str, str]:
    """Every table and view of the catalog, read in full (so this also proves they all open)."""
    import duckdb

    from curation import catalog
    from curation.workspace import Workspace

    ws = Workspace(root)
    if not ws.catalog_path.exists():
        return {}
    con = duckdb.connect(str(ws.catalog_path), read_only=True)
    try:
        home = con.execute("SELECT value FROM catalog_info WHERE key = 'workspace'").fetchall()
    finally:
        con.close()
    if home != [(str(ws.root),)]:  # a copied workspace: repoint its views, as `webdistill sql` does
        catalog.refresh(ws)
    con = duckdb.connect(str(ws.catalog_path), read_only=True)
    try:
        names = con.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' "
                            "ORDER BY table_name").fetchall()
        out = {}
        for (name,) in names:
            if name == "runs":
                stages = [r[0] for r in con.execute("SELECT DISTINCT stage FROM runs ORDER BY stage").fetchall()]
                out["catalog:runs"] = ",".join(stages)
                continue
            out[f"catalog:{name}"] = _rows_digest(con.sql(f'SELECT * FROM "{name}"').to_arrow_table().to_pylist(),
                                                  ws.root)
        return out
    finally:
        con.close()


def records_match_files(root: Path) -> list[str]:
    """Each selection on disk is whole (its tars match its manifest) and has the catalog row that
    describes that manifest; each row names a selection on disk."""
    import duckdb

    if not (root / "catalog.duckdb").exists():
        return []
    con = duckdb.connect(str(root / "catalog.duckdb"), read_only=True)
    try:
        rows = dict(con.execute("SELECT name, manifest_sha256 FROM selections").fetchall())
    finally:
        con.close()
    problems = []
    for manifest_path in sorted(root.glob("selections/*/manifest.json")):
        folder, raw = manifest_path.parent, manifest_path.read_bytes()
        if is_temporary(folder.relative_to(root)):
            continue
        for shard in json.loads(raw)["shards"]:
            path = folder / shard["path"]
            if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != shard["sha256"]:
                problems.append(f"selection {folder.name}: {shard['path']} does not match its manifest")
        if rows.pop(folder.name, None) != hashlib.sha256(raw).hexdigest():
            problems.append(f"selection {folder.name}: no catalog row describes the manifest on disk")
    problems += [f"selection {name}: a catalog row without a folder" for name in rows]
    return problems


def workspace_digest(root: Path, tar_members: bool = False) -> dict[str, str]:
    return tree_digest(root, tar_members) | catalog_digest(root)


def differences(want: dict[str, str], got: dict[str, str]) -> list[str]:
    return sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))


# --- inputs --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Inputs:
    crawl: Path  # a folder of shards
    teacher: Path  # a teacher spec (teacher.json)


def stage_args(stage: str, inputs: Inputs, ws: Path) -> list[str]:
    teacher = str(inputs.teacher)
    args = {
        "ingest": ["ingest", str(inputs.crawl), "--workers", "2"],
        "embed": ["embed", "--embedder", "teacher", "--teacher", teacher, "--workers", "1", "--batch-size", "64"],
        "index": ["index", "--embedder", "teacher"],
        "score": ["score", "--teacher", teacher, "--name", "r1", "--batch-size", "64"],
        "synthesize": ["synthesize", "--teacher", teacher, "--name", "syn", "--per-class", "2",
                       "--conf-threshold", "0.1"],
        "select": ["select", "--name", "sel", "--policy", "dedup | topk:k=60;by=msp", "--synthetic", "syn",
                   "--shard-size", "20"],
    }[stage]
    return args + ["-w", str(ws)]


def copy_tree(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, symlinks=True)
    return dst


# --- the uninterrupted run -----------------------------------------------------------------------

@dataclass
class Baseline:
    """The pipeline's stages run once each without faults: the workspace before each stage, the
    digest after it, and how long it took."""
    inputs: Inputs
    base: Path
    before: dict[str, Path] = field(default_factory=dict)
    expected: dict[str, dict[str, str]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # each stage's work: first write to end

    def build(self, stages: tuple[str, ...] = STAGES) -> Baseline:
        ws = self.base / "baseline"
        ws.mkdir(parents=True, exist_ok=True)
        for stage in stages:
            self.before[stage] = copy_tree(ws, self.base / f"before-{stage}")
            done = run_and_kill(stage_args(stage, self.inputs, ws), ws)
            self.seconds[stage] = done.work_seconds
            if done.returncode != 0:
                raise RuntimeError(f"baseline {stage} failed: {done.stderr[-2000:]}")
            self.expected[stage] = workspace_digest(ws)
        return self

    def fresh(self, stage: str, dst: Path) -> Path:
        """A copy of the workspace as it was before `stage`, its catalog repointed at the copy."""
        from curation import catalog
        from curation.workspace import Workspace

        ws = copy_tree(self.before[stage], dst)
        if (ws / "catalog.duckdb").exists():
            catalog.refresh(Workspace(ws))
        return ws

    def kill_after(self, stage: str, fraction: float) -> float:
        return fraction * self.seconds[stage]


@dataclass
class KillResult:
    stage: str
    delay: float  # s after the run's first write
    killed: bool
    rerun_rc: int
    rerun_error: list[str]
    diff: list[str]
    leftovers_after_kill: list[str]
    leftovers: list[str]
    written_before_kill: int = 0  # finished files the killed run had written: 0 = killed before its first

    @property
    def survived(self) -> bool:
        return self.rerun_rc == 0 and not self.diff


def kill_and_rerun(args: list[str], ws: Path, kill_after: float, expected: dict[str, str],
                   tar_members: bool = False) -> KillResult:
    """Kill `kill_after` s after the run's first write, then rerun it to the end."""
    stage = args[0]
    started = time.time()
    outcome = run_and_kill(args, ws, kill_after)
    after_kill = leftovers(ws)
    written = sum(1 for p in ws.rglob("*") if p.is_file() and not is_temporary(p.relative_to(ws))
                  and p.name not in CATALOG_FILES and p.stat().st_mtime >= started)
    rerun = run_cli(args)
    got = workspace_digest(ws, tar_members) if rerun.returncode == 0 else {}
    diff = differences(expected, got) + records_match_files(ws)
    return KillResult(stage, round(kill_after, 2), outcome.killed, rerun.returncode, one_line(rerun.stderr), diff,
                      after_kill, leftovers(ws), written)


def kill_at_random_point(attempt: Callable[[float], KillResult], work_seconds: float, rng: random.Random,
                         tries: int = 3) -> KillResult:
    """`attempt(kill_after)` at a random point of a run's work, retried earlier when the run finished first."""
    fraction = rng.uniform(0.05, 0.95)
    for _ in range(tries):
        result = attempt(fraction * work_seconds)
        if result.killed:
            break
        fraction /= 3
    return result


def kill_stage(baseline: Baseline, stage: str, work: Path, rng: random.Random) -> KillResult:
    """Kill `stage` at a random point of its work, then rerun it."""
    def attempt(kill_after: float) -> KillResult:
        ws = baseline.fresh(stage, work)
        return kill_and_rerun(stage_args(stage, baseline.inputs, ws), ws, kill_after, baseline.expected[stage])

    return kill_at_random_point(attempt, baseline.seconds[stage], rng)


# --- crawl from a local server -------------------------------------------------------------------

class ImageServer:
    """Distinct PNGs at /img/<i>.png on 127.0.0.1, each answered after `delay_s`, so a crawl of a
    few dozen images lasts long enough to be killed mid-shard."""

    def __init__(self, delay_s: float = 0.05):
        server = self
        self.delay_s = delay_s

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                if not (self.path.startswith("/img/") and name.endswith(".png") and name[:-4].isdigit()):
                    self.send_response(404)
                    self.end_headers()
                    return
                time.sleep(server.delay_s)
                body = encode(noise_image(int(name[:-4]), (24, 24)), "PNG")
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 64

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.handle_error = lambda request, address: None  # killed crawlers hang up mid-request
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url_list(self, path: Path, n: int) -> Path:
        port = self.httpd.server_port
        path.write_text("".join(json.dumps({"url": f"http://127.0.0.1:{port}/img/{i}.png", "caption": f"image {i}"})
                                + "\n" for i in range(n)))
        return path

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def crawl_args(url_list: Path, out: Path) -> list[str]:
    return ["crawl", str(url_list), "--out", str(out), "--shard-size", "8", "--concurrency", "2", "--retries", "0",
            "--timeout", "10", "--allow-private"]


@dataclass
class CrawlBaseline:
    url_list: Path
    expected: dict[str, str]
    seconds: float  # its work: first write to end

    @classmethod
    def build(cls, server: ImageServer, base: Path, n: int = 40) -> CrawlBaseline:
        base.mkdir(parents=True, exist_ok=True)
        url_list = server.url_list(base / "urls.jsonl", n)
        out = base / "crawl-baseline"
        done = run_and_kill(crawl_args(url_list, out), out)
        if done.returncode != 0:
            raise RuntimeError(f"baseline crawl failed: {done.stderr[-2000:]}")
        return cls(url_list, tree_digest(out, tar_members=True), done.work_seconds)


def kill_crawl(baseline: CrawlBaseline, work: Path, rng: random.Random) -> KillResult:
    def attempt(kill_after: float) -> KillResult:
        if work.exists():
            shutil.rmtree(work)
        return kill_and_rerun(crawl_args(baseline.url_list, work), work, kill_after, baseline.expected,
                              tar_members=True)

    return kill_at_random_point(attempt, baseline.seconds, rng)


# --- two writers at once -------------------------------------------------------------------------

def at_once(*arg_lists: list[str], stagger: float = 0.0) -> list[subprocess.CompletedProcess]:
    """Run several CLI invocations at the same time; wait for all."""
    procs = []
    for i, args in enumerate(arg_lists):
        if i and stagger:
            time.sleep(stagger)
        procs.append(subprocess.Popen(cli_cmd(args), cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    out = []
    for args, proc in zip(arg_lists, procs):
        stdout, stderr = proc.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(args, proc.returncode, stdout, stderr))
    return out


@dataclass
class ConcurrentResult:
    scenario: str
    returncodes: list[int]
    errors: list[list[str]]
    catalog_ok: bool
    problems: list[str]

    @property
    def survived(self) -> bool:
        clean = all(rc == 0 or len(err) == 1 for rc, err in zip(self.returncodes, self.errors))
        return clean and self.catalog_ok and not self.problems and any(rc == 0 for rc in self.returncodes)


def _catalog_ok(ws: Path) -> tuple[bool, dict[str, str]]:
    try:
        return True, catalog_digest(ws)
    except Exception as exc:  # noqa: BLE001 - any failure to read a view or table is the finding
        return False, {"error": f"{exc.__class__.__name__}: {exc}"}


def two_selects(baseline: Baseline, work: Path, same_name: bool) -> ConcurrentResult:
    ws = baseline.fresh("select", work)
    a = stage_args("select", baseline.inputs, ws)
    b = ["select", "--name", "sel" if same_name else "other", "--policy", "topk:k=40;by=energy", "--shard-size", "15",
         "-w", str(ws)]
    runs = at_once(a, b)
    ok, _ = _catalog_ok(ws)
    problems = records_match_files(ws) if ok else []
    names = {p.parent.name for p in ws.glob("selections/*/manifest.json")}
    succeeded = {args[args.index("--name") + 1] for args, r in zip((a, b), runs) if r.returncode == 0}
    if names != succeeded:  # a select that failed (cleanly) must leave no selection behind
        problems.append(f"selections on disk: {sorted(names)}, runs that succeeded: {sorted(succeeded)}")
    problems += [f"leftover {p}" for p in leftovers(ws)]
    return ConcurrentResult("two selects, " + ("one name" if same_name else "two names"),
                            [r.returncode for r in runs], [one_line(r.stderr) for r in runs], ok, problems)


def two_ingests(baseline: Baseline, work: Path, same_shards: bool) -> ConcurrentResult:
    """Two ingests at once (the same shards, or two halves of the crawl): the catalog's samples,
    rejects and shards views must equal one uninterrupted ingest's."""
    ws = baseline.fresh("ingest", work)
    shards = sorted(str(p) for p in baseline.inputs.crawl.glob("*.tar"))
    halves = (shards, shards) if same_shards else (shards[: len(shards) // 2], shards[len(shards) // 2:])
    runs = at_once(*(["ingest", *half, "--workers", "1", "-w", str(ws)] for half in halves))
    ok, got = _catalog_ok(ws)
    want = baseline.expected["ingest"]
    views = ("catalog:samples", "catalog:rejects", "catalog:shards")
    problems = [f"{v} differs from one ingest's" for v in views if ok and got.get(v) != want.get(v)]
    problems += [f"leftover {p}" for p in leftovers(ws)]
    return ConcurrentResult("two ingests, " + ("same shards" if same_shards else "different shards"),
                            [r.returncode for r in runs], [one_line(r.stderr) for r in runs], ok, problems)


def score_while_querying(baseline: Baseline, work: Path) -> ConcurrentResult:
    """`score` (a second run name) while read-only queries run back to back (in this process, through
    the library `webdistill sql` calls: a subprocess per query would mostly measure imports)."""
    from curation import catalog
    from curation.errors import WebdistillError
    from curation.workspace import Workspace

    ws = baseline.fresh("select", work)
    args = stage_args("score", baseline.inputs, ws)
    args[args.index("r1")] = "r2"
    proc = subprocess.Popen(cli_cmd(args), cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    outcomes = []  # one line per query that failed, "" per query that ran
    while proc.poll() is None:
        try:
            catalog.query(Workspace(ws), "SELECT count(*) AS n, count(msp) AS scored FROM candidates")
            outcomes.append("")
        except WebdistillError as exc:  # anything else escapes: it is the finding
            outcomes.append(f"webdistill: error: {exc}")
        time.sleep(0.05)
    stdout, stderr = proc.communicate()
    final = run_cli(["sql", "SELECT count(*) AS n FROM scores WHERE run = 'r2'", "--format", "json", "-w", str(ws)])
    ok, _ = _catalog_ok(ws)
    problems = [f"sql: {line}" for line in outcomes if line and "busy" not in line]
    if final.returncode != 0 or not json.loads(final.stdout)[0]["n"]:
        problems.append("the second scoring run is not in the scores view")
    return ConcurrentResult(f"score while {len(outcomes)} queries ran ({sum(map(bool, outcomes))} found it busy)",
                            [proc.returncode] + [2 if line else 0 for line in outcomes] + [final.returncode],
                            [one_line(stderr)] + [[line] if line else [] for line in outcomes]
                            + [one_line(final.stderr)],
                            ok, problems)


# --- a corrupt catalog ---------------------------------------------------------------------------

def _overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


CORRUPTIONS: dict[str, Callable[[Path, random.Random], None]] = {
    "garbage": lambda p, rng: p.write_bytes(rng.randbytes(p.stat().st_size)),
    "garbage header": lambda p, rng: _overwrite(p, 0, rng.randbytes(4096)),
    "zeroed header": lambda p, rng: _overwrite(p, 0, bytes(4096)),
    "empty file": lambda p, rng: p.write_bytes(b""),
    "garbage blocks": lambda p, rng: _overwrite(p, 3 * 4096, rng.randbytes(p.stat().st_size - 3 * 4096)),
    "a text file": lambda p, rng: p.write_text("this is not a database\n"),
}


@dataclass
class CorruptResult:
    kind: str
    lines: dict[str, list[str]]  # verb -> its error lines
    rebuilt: bool
    problems: list[str]

    @property
    def survived(self) -> bool:
        return self.rebuilt and not self.problems


def corrupt_catalog(baseline: Baseline, work: Path, kind: str, seed: int = 0) -> CorruptResult:
    """Damage catalog.duckdb; every verb that touches it must say it is corrupt and how to rebuild it
    (never "busy", never an internal error); `webdistill refresh --rebuild` brings back every view
    and the selections from their manifests."""
    ws = copy_tree(baseline.base / "baseline", work)
    (ws / "catalog.duckdb.wal").unlink(missing_ok=True)
    CORRUPTIONS[kind](ws / "catalog.duckdb", random.Random(seed))
    verbs = {"sql": ["sql", "SELECT count(*) FROM samples", "-w", str(ws)],
             "ingest": ["ingest", str(baseline.inputs.crawl), "--workers", "1", "-w", str(ws)],
             "select": stage_args("select", baseline.inputs, ws)}
    lines, problems = {}, []
    for verb, args in verbs.items():
        done = run_cli(args)
        lines[verb] = one_line(done.stderr)
        text = " ".join(lines[verb]).lower()
        if done.returncode == 0 or len(lines[verb]) != 1 or "corrupt" not in text or "refresh" not in text:
            problems.append(f"{verb}: rc {done.returncode}: {lines[verb] or done.stderr[-300:]}")
        if "busy" in text or "internal error" in text:
            problems.append(f"{verb} calls a corrupt catalog busy or an internal error: {lines[verb]}")
    rebuild = run_cli(["refresh", "--rebuild", "-w", str(ws)])
    rebuilt = rebuild.returncode == 0
    if rebuilt:
        ok, got = _catalog_ok(ws)
        want = baseline.expected["select"]
        if not ok:
            problems.append(f"the rebuilt catalog does not read: {got}")
        else:
            want = {k: v for k, v in want.items() if k.startswith("catalog:") and k != "catalog:runs"}
            got.pop("catalog:runs", None)  # the log of past runs is what a rebuild loses
            problems += [f"{k} differs after the rebuild" for k in differences(want, got)]
            problems += records_match_files(ws)
    else:
        problems.append(f"refresh --rebuild: rc {rebuild.returncode}: {rebuild.stderr[-300:]}")
    return CorruptResult(kind, lines, rebuilt, problems)


# --- disk full and permission errors -------------------------------------------------------------

def can_mount() -> bool:
    """Whether this process may mount a tmpfs (root, or CAP_SYS_ADMIN)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    probe = Path(f"/tmp/webdistill-mount-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    try:
        mount = ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)]
        if subprocess.run(mount, capture_output=True).returncode:
            return False
        subprocess.run(["umount", str(probe)], check=True)
        return True
    finally:
        probe.rmdir()


@contextmanager
def tmpfs(path: Path, size: int) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


def _used_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@contextmanager
def workspace_on_tmpfs(before: Path, mount_point: Path) -> Iterator[Path]:
    """A copy of `before` on a fresh tmpfs, its catalog repointed there (as any first stage would)."""
    from curation import catalog
    from curation.workspace import Workspace

    with tmpfs(mount_point, 256 * 2**20) as ws:
        for item in before.iterdir():
            if item.is_dir():
                shutil.copytree(item, ws / item.name, symlinks=True)
            else:
                shutil.copy2(item, ws / item.name)
        if (ws / "catalog.duckdb").exists():
            catalog.refresh(Workspace(ws))
        yield ws


def no_partial_artifacts(ws: Path) -> list[str]:
    """Every artifact reads whole, and no temporary is left."""
    problems = [f"leftover {p}" for p in leftovers(ws)]
    for path in ws.rglob("*"):
        rel = path.relative_to(ws)
        if not path.is_file() or str(rel) in CATALOG_FILES or is_temporary(rel):
            continue
        try:
            file_digest(path, ws, tar_members=True)  # parsing a tar finds one cut short
        except Exception as exc:  # noqa: BLE001 - an unreadable artifact is the finding
            problems.append(f"{rel} is partial: {exc.__class__.__name__}")
    ok, got = _catalog_ok(ws)
    if not ok:
        problems.append(f"catalog: {got}")
    return problems


@dataclass
class StorageResult:
    stage: str
    fault: str  # one of STORAGE_FAULTS
    how: str  # the mechanism this machine allowed
    returncode: int
    lines: list[str]
    problems: list[str]
    rerun_diff: list[str]

    @property
    def survived(self) -> bool:
        return not self.problems and not self.rerun_diff


def _check_line(done: subprocess.CompletedProcess, words: tuple[str, ...]) -> list[str]:
    lines = one_line(done.stderr)
    if done.returncode == 0:
        return ["the stage succeeded although it could not write"]
    problems = []
    if len(lines) != 1:
        problems.append(f"{len(lines)} error lines: {lines or done.stderr[-400:]}")
    if lines and not any(w in lines[0].lower() for w in words):
        problems.append(f"the line does not name the cause: {lines[0]}")
    if any("internal error" in line for line in lines):
        problems.append(f"an internal error: {lines}")
    return problems


STORAGE_FAULTS = ("disk full", "read-only filesystem", "no permission")
_CAUSE_WORDS = {"disk full": ("no space left", "file too large"), "read-only filesystem": ("read-only",),
                "no permission": ("permission denied", "operation not permitted")}


def _limit_file_size(limit: int) -> Callable[[], None]:
    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # writes past it fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return apply


def storage_fault(baseline: Baseline, stage: str, fault: str, work: Path) -> StorageResult:
    """Run `stage` where it cannot write (see `_storage_fault`)."""
    return _storage_fault(stage, baseline.before[stage], lambda ws: stage_args(stage, baseline.inputs, ws),
                          baseline.expected[stage], fault, work)


def crawl_storage_fault(crawled: CrawlBaseline, fault: str, work: Path) -> StorageResult:
    """Crawl into a folder that cannot be written (see `_storage_fault`)."""
    empty = work.parent / f"{work.name}-empty"
    empty.mkdir(parents=True, exist_ok=True)
    return _storage_fault("crawl", empty, lambda out: crawl_args(crawled.url_list, out), crawled.expected, fault,
                          work, tar_members=True)


def _storage_fault(stage: str, before: Path, make_args: Callable[[Path], list[str]], expected: dict[str, str],
                   fault: str, work: Path, tar_members: bool = False, slack: int = 8192) -> StorageResult:
    """Run a stage where it cannot write: a tmpfs with `slack` bytes free ("disk full"), a tmpfs
    remounted read-only, or folders without write permission. Where mounting is not allowed (not
    root), a full disk is RLIMIT_FSIZE and a read-only filesystem is folders without permission.
    Then the fault is lifted and the stage reruns: it must give the uninterrupted result."""
    mount = can_mount()
    with ExitStack() as stack:
        if mount:
            ws = stack.enter_context(workspace_on_tmpfs(before, work))
        else:
            ws = copy_tree(before, work)
            if (ws / "catalog.duckdb").exists():
                from curation import catalog
                from curation.workspace import Workspace

                catalog.refresh(Workspace(ws))
        args = make_args(ws)
        prefix: tuple[str, ...] = ()
        preexec = None
        if fault == "disk full" and mount:
            how, undo = "tmpfs with 8 KiB free", lambda: remount(ws, f"size={256 * 2**20}")
            remount(ws, f"size={_used_bytes(ws) + slack}")
        elif fault == "disk full":
            how, undo, preexec = "RLIMIT_FSIZE of 8 KiB", lambda: None, _limit_file_size(slack)
        elif fault == "read-only filesystem" and mount:
            how, undo = "tmpfs remounted read-only", lambda: remount(ws, "rw")
            remount(ws, "ro")
        else:
            folders = [ws] + [p for p in ws.rglob("*") if p.is_dir()]
            for d in folders:
                d.chmod(0o555)
            how = "folders chmod 555"
            if os.geteuid() == 0:  # root ignores modes unless it drops CAP_DAC_OVERRIDE
                prefix = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--")
                how += ", CLI without CAP_DAC_OVERRIDE"

            def undo() -> None:
                for d in folders:
                    d.chmod(0o755)
        try:
            done = run_cli(args, prefix=prefix, preexec_fn=preexec)
        finally:
            undo()
        words = _CAUSE_WORDS[fault] + (_CAUSE_WORDS["no permission"] if how.startswith("folders") else ())
        problems = _check_line(done, words) + no_partial_artifacts(ws)
        rerun = run_cli(args)
        diff = (differences(expected, workspace_digest(ws, tar_members)) + records_match_files(ws)
                if rerun.returncode == 0 else [f"rerun failed: {one_line(rerun.stderr)}"])
        return StorageResult(stage, fault, how, done.returncode, one_line(done.stderr), problems, diff)
