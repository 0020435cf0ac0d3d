"""How every bench script hands back its figures: the JSON and the markdown table on stdout, and
OUT.json / OUT.md beside each other when --out names them."""
from __future__ import annotations

import json
from pathlib import Path


def emit(result: dict, table: str, out: str | None) -> None:
    print(json.dumps(result, indent=2))
    print()
    print(table)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out + ".json").write_text(json.dumps(result, indent=2))
        Path(out + ".md").write_text(table + "\n")
