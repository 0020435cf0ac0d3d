"""The README is a tested artifact: every command it shows parses with the CLI it documents, its
pipeline YAML is the one `make demo` writes, and what it says of the verbs holds. Its SQL examples run
against a two-round pipeline's workspace in tests/test_flows.py."""
import contextlib
import importlib
import io
import re
from pathlib import Path

import pytest
import yaml

from curation.workspace import Workspace
from flows.cli import build_parser
from flows.demo.run import pipeline_config
from flows.pipeline_config import load_pipeline_config

from .readme import README, block, command_lines

COMMAND_SECTIONS = ("The command line",)


def _verbs() -> dict[str, object]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return dict(sub.choices)


def _parses(argv: list[str]) -> str | None:
    """None when the CLI's parser accepts argv, else what it printed."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser().parse_args(argv)
        except SystemExit as exc:
            return err.getvalue() or f"exit {exc.code}"
    return None


@pytest.mark.parametrize("section", COMMAND_SECTIONS)
def test_every_command_in_the_readme_parses(section):
    commands = command_lines(section)
    assert len(commands) > 20
    failures = {}
    for argv in commands:
        if argv[0] == "webdistill":
            failures[" ".join(argv)] = _parses(argv[1:])
        elif argv[0] in ("python", "torchrun") and "-m" in argv:
            module = importlib.import_module(argv[argv.index("-m") + 1])
            failures[" ".join(argv)] = None if callable(getattr(module, "main", None)) else "no main()"
        else:
            failures[" ".join(argv)] = f"not a webdistill command: {argv[0]}"
    assert {k: v for k, v in failures.items() if v} == {}
    assert {argv[1] for argv in commands if argv[0] == "webdistill"} == set(_verbs()), \
        "the README shows every verb"


def test_a_command_the_parser_refuses_is_caught():
    # the check above can fail: a flag the CLI does not have is refused
    assert _parses(["select", "--name", "x", "--no-such-flag"])
    assert _parses(["select", "--name", "x"]) is None


def test_make_targets_the_readme_names_exist():
    targets = set(re.findall(r"^([a-z-]+):", (README.parent / "Makefile").read_text(), re.M))
    named = set(re.findall(r"`make ([a-z-]+)`", README.read_text()))
    assert {"demo", "test"} <= named <= targets


def test_what_the_readme_says_of_the_workspace_flag_holds():
    without = {name for name, p in _verbs().items()
               if "-w" not in {o for a in p._actions for o in a.option_strings}}
    sentence = re.search(r"^Every verb .*?-w/--workspace.*?\.$", README.read_text(), re.M | re.S).group(0)
    for verb in without:
        assert f"`{verb}`" in sentence, f"the README says `{verb}` takes -w"


def test_the_readme_pipeline_yaml_is_the_one_the_demo_writes(tmp_path):
    demo_args = build_parser().parse_args(["demo"])
    out = tmp_path / "demo"
    out.mkdir()
    clip = {"embedder": "open_clip:webdistill-tiny-clip", "path": str(out / "clip" / "webdistill-tiny-clip.pt")}
    written = pipeline_config(Workspace(tmp_path / "workspace"), out, clip, rounds=demo_args.rounds,
                              workers=demo_args.workers, distill_epochs=15)
    shown = yaml.safe_load(block("The pipeline config", "yaml"))
    assert shown == yaml.safe_load(written.read_text())
    # the paths are relative to the YAML's folder: they resolve where the demo put things
    cfg = load_pipeline_config(written)
    assert Path(cfg.workspace) == (tmp_path / "workspace").resolve()
    assert Path(cfg.path(shown["score"]["teacher"])) == (out / "teacher" / "teacher.json").resolve()
