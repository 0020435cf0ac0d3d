"""The `webdistill` command line.

Every verb takes -w/--workspace (default: $WEBDISTILL_WORKSPACE, else ./workspace).
Errors a user can fix are one line on stderr and exit code 2; a partly failed stage
(some shards unreadable) exits 1 after doing all the work it could.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import traceback
from datetime import datetime, timezone

# Offline by default: no hub downloads, no telemetry.
for _var, _value in (("HF_HUB_OFFLINE", "1"), ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("DO_NOT_TRACK", "1")):
    os.environ.setdefault(_var, _value)

from curation import catalog  # noqa: E402
from curation.errors import WebdistillError  # noqa: E402
from curation.workspace import resolve_workspace  # noqa: E402


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + error
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _workspace_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("-w", "--workspace", default=None,
                        help="workspace directory (default: $WEBDISTILL_WORKSPACE, else ./workspace)")
    return parent


def cmd_ingest(args: argparse.Namespace) -> int:
    from curation.ingest import ingest
    from curation.validate import ValidationConfig

    ws = resolve_workspace(args.workspace)
    config = ValidationConfig(max_image_bytes=args.max_image_bytes, max_pixels=args.max_pixels, min_side=args.min_side)
    started = datetime.now(timezone.utc)
    summary = ingest(ws, args.shards, config, workers=args.workers, source=args.source)
    catalog.refresh(ws)
    reasons: dict[str, int] = {}
    for r in summary.shards:
        for k, v in r.reasons.items():
            reasons[k] = reasons.get(k, 0) + v
    catalog.record_run(ws, "ingest", started, {k: v for k, v in vars(args).items() if k != "func"},
                       {"shards": len(summary.shards), "skipped": summary.skipped, "accepted": summary.accepted,
                        "rejected": summary.rejected, "failed": summary.failed, "missing": summary.missing})
    done = len(summary.shards) - summary.skipped
    line = f"ingest: {done} shard(s) ingested, {summary.skipped} unchanged and skipped; "
    line += f"{sum(r.n_accepted for r in summary.shards if not r.skipped)} accepted, "
    line += f"{sum(r.n_rejected for r in summary.shards if not r.skipped)} rejected"
    if reasons:
        line += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())) + ")"
    print(line)
    for spec in summary.missing:
        print(f"webdistill: error: no shard matches {spec}", file=sys.stderr)
    for url, why in summary.failed.items():
        print(f"webdistill: error: shard {url} failed: {why}", file=sys.stderr)
    if not summary.shards and (summary.missing or summary.failed):
        return 2
    return 1 if (summary.missing or summary.failed) else 0


def cmd_sql(args: argparse.Namespace) -> int:
    ws = resolve_workspace(args.workspace)
    table = catalog.query(ws, args.query)
    if args.format == "csv":
        import pyarrow.csv as pacsv

        buf = io.BytesIO()
        pacsv.write_csv(table, buf)
        sys.stdout.write(buf.getvalue().decode())
    elif args.format == "json":
        json.dump(table.to_pylist(), sys.stdout, default=str, indent=None)
        sys.stdout.write("\n")
    else:
        import duckdb

        duckdb.from_arrow(table).show(max_rows=args.max_rows, max_width=args.max_width)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from flows.demo import run_demo

    return run_demo(
        workspace=resolve_workspace(args.workspace), out=args.out, size=args.size, n_shards=args.shards,
        teacher_epochs=args.teacher_epochs, workers=args.workers, seed=args.seed,
    )


def build_parser() -> argparse.ArgumentParser:
    ws = _workspace_parent()
    parser = _Parser(
        prog="webdistill",
        description="Curate a web crawl into a transfer set for a teacher, and distil a student on it. "
        "Every stage writes per-shard artifacts into the workspace; `catalog.duckdb` there has SQL views over all of them.",
    )
    sub = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser, metavar="VERB")

    p = sub.add_parser("ingest", parents=[ws], help="validate crawled WebDataset shards and record them in the catalog",
                       description="Read shards (paths, directories, globs, brace patterns such as "
                       "'crawl/{00000..00099}.tar', fsspec URLs, or 'pipe:CMD'), fully decode every image, and record "
                       "each sample in the `samples` view or, with a reason, in `rejects`. Shards already ingested "
                       "with the same content and limits are skipped, so reruns and added shards are cheap.")
    p.add_argument("shards", nargs="+", metavar="SHARDS", help="shard paths, patterns or URLs")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="parallel processes (default: %(default)s)")
    p.add_argument("--source", default=None, help="prefix for shard names, to tell apart crawls with the same file names")
    p.add_argument("--max-image-bytes", type=int, default=32 * 1024 * 1024, help="largest image file accepted (default: 32 MiB)")
    p.add_argument("--max-pixels", type=int, default=40_000_000,
                   help="decompression-bomb guard: largest width*height decoded (default: %(default)s)")
    p.add_argument("--min-side", type=int, default=8, help="smallest width or height accepted (default: %(default)s)")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("sql", parents=[ws], help="run read-only SQL against the catalog",
                       description="Run one read-only SELECT against catalog.duckdb. Views: "
                       + ", ".join(f"{k} ({v.description})" for k, v in catalog.VIEWS.items())
                       + "; tables: runs. Writes, ATTACH, COPY, INSTALL/LOAD and files outside the workspace are refused.")
    p.add_argument("query", help='e.g. "SELECT reason, count(*) FROM rejects GROUP BY reason"')
    p.add_argument("--format", choices=["table", "csv", "json"], default="table", help="output format (default: table)")
    p.add_argument("--max-rows", type=int, default=40, help="rows shown by --format table (default: %(default)s)")
    p.add_argument("--max-width", type=int, default=None, help="width of --format table (default: terminal)")
    p.set_defaults(func=cmd_sql)

    p = sub.add_parser("demo", parents=[ws], help="build the demo crawl and teacher from offline data, then run the pipeline",
                       description="Build a crawl of real images (MNIST as the teacher's domain, mixed with Fashion-MNIST, "
                       "animal silhouettes, letters, natural-image crops and 8x8 digits) with planted defects and "
                       "duplicates, train a small teacher on a kept-aside MNIST split, ingest the crawl, and print "
                       "what was found against the ground truth.")
    p.add_argument("--out", default="demo", help="where the crawl, eval set and teacher go (default: %(default)s)")
    p.add_argument("--size", type=int, default=52_000, help="samples in the crawl (default: %(default)s)")
    p.add_argument("--shards", type=int, default=24, help="shards in the crawl (default: %(default)s)")
    p.add_argument("--teacher-epochs", type=int, default=20, help="teacher training epochs (default: %(default)s)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="parallel processes (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of everything random in the demo (default: %(default)s)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except WebdistillError as exc:
        print(f"webdistill: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("webdistill: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - last resort: still one line unless asked for more
        if os.environ.get("WEBDISTILL_DEBUG"):
            traceback.print_exc()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"webdistill: internal error: {exc.__class__.__name__}: {first} (WEBDISTILL_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
