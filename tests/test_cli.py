from .conftest import run_cli


def one_error_line(res) -> str:
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


def test_missing_shard(tmp_path):
    line = one_error_line(run_cli("ingest", "-w", str(tmp_path / "ws"), str(tmp_path / "nothing-{0..2}.tar")))
    assert "no shard matches" in line


def test_sql_before_ingest(tmp_path):
    assert "no catalog" in one_error_line(run_cli("sql", "-w", str(tmp_path / "ws"), "SELECT 1"))


def test_bad_arguments():
    assert "error" in one_error_line(run_cli("ingest"))
    assert "error" in one_error_line(run_cli("no-such-verb"))


def test_help_explains_every_verb():
    res = run_cli("--help")
    assert res.returncode == 0
    for verb in ("ingest", "sql", "demo"):
        assert verb in res.stdout
        sub = run_cli(verb, "--help")
        assert sub.returncode == 0 and "--workspace" in sub.stdout


def test_ingest_then_sql_from_the_command_line(tmp_path, small_crawl):
    ws = str(tmp_path / "ws")
    res = run_cli("ingest", "-w", ws, str(small_crawl / "crawl" / "{00000..00002}.tar"), "--workers", "2")
    assert res.returncode == 0, res.stderr
    assert "3 shard(s) ingested" in res.stdout and "truncated_tar: 1" in res.stdout
    again = run_cli("ingest", "-w", ws, str(small_crawl / "crawl"))
    assert "0 shard(s) ingested, 3 unchanged" in again.stdout
    out = run_cli("sql", "-w", ws, "SELECT stage, count(*) AS n FROM runs GROUP BY ALL", "--format", "csv").stdout
    assert out.strip().splitlines()[1] == '"ingest",2'
    # WEBDISTILL_WORKSPACE is the default workspace
    env_res = run_cli("sql", "SELECT count(*) AS n FROM shards", "--format", "csv", env={"WEBDISTILL_WORKSPACE": ws})
    assert env_res.stdout.strip().splitlines()[1] == "3"
