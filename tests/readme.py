"""The README's code blocks, read as the tests run them: its commands, its pipeline YAML and its SQL."""
import re
import shlex
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def block(heading: str, lang: str) -> str:
    """The first ```lang block after the heading line `heading` (a markdown heading's text)."""
    text = README.read_text()
    start = re.search(rf"^#+ {re.escape(heading)}\s*$", text, re.M)
    assert start, f"README has no heading {heading!r}"
    code = re.search(rf"^```{lang}\n(.*?)^```", text[start.end():], re.M | re.S)
    assert code, f"README's {heading!r} has no {lang} block"
    return code.group(1)


def command_lines(heading: str) -> list[list[str]]:
    """Each shell command of a bash block, continuation lines joined, comments dropped, as argv."""
    joined = block(heading, "bash").replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
            commands.append(argv)
    return commands


def sql_statements(heading: str) -> list[str]:
    """The statements of a sql block, split on `;` at line ends (the README's examples use no `;` inside)."""
    body = "\n".join(line for line in block(heading, "sql").splitlines() if not line.lstrip().startswith("--"))
    return [s.strip() for s in re.split(r";\s*$", body, flags=re.M) if s.strip()]
