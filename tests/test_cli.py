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
    """Each is one line `PROG: error: MESSAGE (see --help)` naming what was wrong, exit code 2, nothing on stdout."""
    cases = [  # (arguments, the parser that refuses them, the start of its message)
        ((), "webdistill", "the following arguments are required: VERB"),
        (("no-such-verb",), "webdistill", "argument VERB: invalid choice: 'no-such-verb' (choose from 'crawl', "),
        (("ingest",), "webdistill ingest", "the following arguments are required: SHARDS"),
        (("sql", "--no-such-option", "SELECT 1"), "webdistill", "unrecognized arguments: --no-such-option"),
        (("sql", "--format", "xml", "SELECT 1"), "webdistill sql",
         "argument --format: invalid choice: 'xml' (choose from 'table', 'csv', 'json', 'parquet')"),
        (("crawl", "urls.csv", "--out", "shards", "--shard-size", "many"), "webdistill crawl",
         "argument --shard-size: invalid int value: 'many'"),
    ]
    for args, prog, message in cases:
        res = run_cli(*args)
        line = one_error_line(res)
        assert res.returncode == 2 and res.stdout == "", (args, res)
        assert line.startswith(f"{prog}: error: {message}") and line.endswith(" (see --help)"), (args, line)


def test_help_explains_every_verb():
    """Every verb the parser has: listed with its summary in `--help`, and its own `--help` exits 0 with a
    description and help text for every argument."""
    import argparse

    from flows.cli import build_parser

    def flat(text: str) -> str:  # help is wrapped to the terminal, and may break a line at a hyphen
        return "".join(text.split())

    [verbs] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(verbs.choices) >= 14, sorted(verbs.choices)
    top = run_cli("--help")
    assert top.returncode == 0, top.stderr
    summaries = {a.dest: a.help for a in verbs._choices_actions}
    shown = {}
    for verb, parser in verbs.choices.items():
        assert summaries.get(verb), f"{verb} has no summary"
        assert flat(f"{verb} {summaries[verb]}") in flat(top.stdout), verb
        res = run_cli(verb, "--help")
        assert res.returncode == 0 and res.stderr == "", (verb, res.stderr)
        shown[verb] = res.stdout
        assert parser.description and flat(parser.description) in flat(res.stdout), f"{verb} has no description"
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            name = "/".join(action.option_strings) or action.metavar or action.dest
            assert action.help and action.help != argparse.SUPPRESS, f"{verb} {name} has no help text"
            assert flat(parser._get_formatter()._expand_help(action)) in flat(res.stdout), f"{verb} {name}"
            assert all(option in res.stdout for option in action.option_strings), f"{verb} {name}"
    for verb in ("ingest", "sql", "demo"):
        assert "--workspace" in shown[verb], verb


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
