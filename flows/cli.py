"""The `webdistill` command line.

Every verb takes -w/--workspace (default: $WEBDISTILL_WORKSPACE, else ./workspace).
Errors a user can fix are one line on stderr and exit code 2; a partly failed stage
(some shards unreadable) exits 1 after doing all the work it could.

Each verb is a pair: `cmd_<verb>` (what it does, through the stage's runner in
flows/stage_runner.py, which the Prefect flows call too) and `add_<verb>_parser` (its options).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import traceback
from pathlib import Path

# Offline by default: no hub downloads, no telemetry. OpenMP threads that sleep instead of spinning
# leave CPU to the decode workers that feed the model (measured in bench/embed_throughput.py).
for _var, _value in (("HF_HUB_OFFLINE", "1"), ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("DO_NOT_TRACK", "1"),
                     ("OMP_WAIT_POLICY", "PASSIVE")):
    os.environ.setdefault(_var, _value)

# Cheap imports only at the top: `webdistill --help` and `webdistill sql` must stay fast. The stage
# modules (torch, open_clip, FAISS, webdataset: seconds to import) are imported inside the verbs that
# use them, Prefect only by the verbs that run flows (run, serve, demo), and pandas (policies), PIL
# (validate) and fsspec (remote) only where a verb needs them.
import pyarrow as pa  # noqa: E402 - loaded by the catalog anyway

from curation import catalog, user_sql  # noqa: E402
from curation.errors import WebdistillError, first_line, missing_storage_package, storage_error  # noqa: E402
from curation.files import is_remote  # noqa: E402
from curation.workspace import resolve_workspace  # noqa: E402
from flows import stage_runner  # noqa: E402
from flows.cli_output import FORMATS, write_result  # noqa: E402
from flows.stage_runner import StageFailed  # noqa: E402


class _Parser(argparse.ArgumentParser):
    @property
    def description(self) -> str | None:
        if callable(self._description):  # made when first read (--help): it imports what it describes
            self._description = self._description()
        return self._description

    @description.setter
    def description(self, value) -> None:
        self._description = value

    def error(self, message: str) -> None:  # one line, not usage + error
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _workspace_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("-w", "--workspace", default=None,
                        help="workspace directory (default: $WEBDISTILL_WORKSPACE, else ./workspace)")
    return parent


MODEL_SPECS = ("Model specs: a .json spec ({\"factory\": NAME, \"weights\": \"w.pt\", ...}), a torch.export "
               "program (.pt2), torchvision:NAME[@w.pt], timm:NAME[@w.pt], module:factory[@w.pt] or a TorchScript "
               "file. Loaded without trust: state_dicts (weights_only=True), checked .pt2 programs, and factories from "
               "the project's registry (tiny_cnn, small_cnn, distill.models:*), torchvision: and timm:. TorchScript "
               "and other module:factory specs run code and need --trust-model-code.")


def _trust_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-model-code", action="store_true",
                   help="let model files run their own code: TorchScript files and module:factory specs outside the "
                   "registry (off by default; .json specs, .pt2 programs and state_dicts need no trust)")


def _overwrite_option(p: argparse.ArgumentParser, replaces: str, kept: str) -> None:
    """One --overwrite for every verb that refuses to replace a different thing of the same name."""
    p.add_argument("--overwrite", action="store_true", help=f"replace {replaces} (refused otherwise; {kept})")


def _index_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embedder", default="open_clip:ViT-S-32", help="which embeddings (default: %(default)s)")
    p.add_argument("--nprobe", type=int, default=32, help="IVF lists probed per query (default: %(default)s)")


def _error(message: str) -> None:
    print(f"webdistill: error: {message}", file=sys.stderr)


def _progress_line(line: str) -> None:
    """A phase of long work, on stderr when it is a terminal, as progress bars are (so that a failing
    verb's stderr stays its one error line); WEBDISTILL_PROGRESS=1 shows it anywhere, 0 (-q) nowhere."""
    wanted = os.environ.get("WEBDISTILL_PROGRESS")
    if wanted == "1" or (wanted != "0" and sys.stderr.isatty()):
        print(line, file=sys.stderr, flush=True)


def _counts(counts: dict[str, int]) -> str:
    """` (reason: n, ...)`, or nothing for no counts."""
    return " (" + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) + ")" if counts else ""


def _absolute_if_file(path: str) -> str:
    return str(Path(path).resolve()) if Path(path).exists() else path


# --- output ------------------------------------------------------------------------------

def _print_table(table, args: argparse.Namespace, keep: tuple[str, ...] = ()) -> None:
    """Write a result as the user asked (--format, --out, --max-rows, --max-width)."""
    out = getattr(args, "out", None)
    if args.format == "parquet" and not out:
        raise WebdistillError("--format parquet writes a file: give it --out FILE")
    try:
        write_result(table, args.format, out, max_rows=getattr(args, "max_rows", None) or 40,
                     max_width=getattr(args, "max_width", None), keep=keep)
    except OSError as exc:
        raise WebdistillError(f"cannot write {out}: {exc.strerror or exc}") from exc
    if out:
        print(f"{table.num_rows} rows written to {out} ({args.format})", file=sys.stderr)


def _output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=FORMATS, default="table",
                   help="output format (default: table, fitted to the terminal); csv and json hold every column "
                   "(lists and structs are JSON text in csv, NaN is null in json, JSON columns are JSON values); "
                   "parquet needs --out")
    p.add_argument("--out", default=None, help="write the result to FILE instead of stdout (any --format)")
    p.add_argument("--max-width", type=int, default=None,
                   help="width of --format table (default: the terminal's); columns that do not fit are named")


# --- crawl ----------------------------------------------------------------------------------

def cmd_crawl(args: argparse.Namespace) -> int:
    from curation.crawl import CrawlConfig

    config = CrawlConfig(shard_size=args.shard_size, timeout_s=args.timeout, max_bytes=args.max_bytes,
                         concurrency=args.concurrency, retries=args.retries, allow_private=args.allow_private,
                         allowed_networks=tuple(args.allow_network or ()))
    try:
        summary, failed = stage_runner.run_crawl(args.url_list, args.out, config, workers=args.workers,
                                                 overwrite=args.overwrite), False
    except StageFailed as exc:  # printed below, after the shards that did finish
        summary, failed = exc.summary, True
    print(f"crawl: {summary['crawled']} shard(s) crawled, {summary['skipped']} finished before and skipped; "
          f"{summary['successes']} images, {summary['failures']} failed" + _counts(summary["error_kinds"])
          + f"; shards in {args.out} (next: webdistill ingest {args.out})")
    for name, why in summary["failed"].items():
        _error(f"shard {name} failed: {why}")
    if summary["successes"] == 0 and summary["failures"] and not summary["skipped"]:
        kinds = summary["error_kinds"]
        commonest = max(kinds, key=kinds.get) if kinds else None
        _error(f"not one of the {summary['failures']} URLs was downloaded; " + _CRAWL_HINTS.get(
            commonest, f"each URL's reason is in {args.out}/NNNNN.parquet (error_kind, error_message)"))
        return 2
    return 1 if failed else 0


# What to do when every URL failed, by the most common reason.
_CRAWL_HINTS = {
    "blocked_address": "they point at non-public addresses: --allow-private opens loopback and private ranges, "
                       "--allow-network CIDR a network you name",
    "dns_error": "their hosts do not resolve: is this machine offline, or the list's hosts wrong?",
    "connect_timeout": "no host answered: is this machine offline, or behind a proxy?",
    "connection_error": "no host could be reached: is this machine offline?",
    "bad_url": "the list's url column holds no valid URLs",
    "bad_scheme": "only http and https URLs are crawled",
}


def add_crawl_parser(sub, ws: argparse.ArgumentParser) -> None:
    p = sub.add_parser("crawl", help="download a URL list into WebDataset shards (img2dataset's layout)",
                       description="Read a URL list (parquet, csv or jsonl with a `url` column and an optional "
                       "`caption`) and write shards of {key}.jpg|png|webp, {key}.json and {key}.txt, plus a per-shard "
                       "parquet of every URL's status. Bounded: timeouts, a maximum size, content-type and magic-byte "
                       "checks, a concurrency limit, retries with backoff; private and loopback addresses are refused. "
                       "Finished shards are skipped, so a rerun resumes.")
    p.add_argument("url_list", help="parquet/csv/jsonl file with a url column")
    p.add_argument("--out", required=True, help="folder for the shards")
    p.add_argument("--shard-size", type=int, default=1000, help="URLs per shard (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default: %(default)s)")
    p.add_argument("--max-bytes", type=int, default=10 * 2**20, help="largest body accepted (default: 10 MiB)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight per shard (default: %(default)s)")
    p.add_argument("--retries", type=int, default=2, help="retries on timeouts and 5xx (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="shards crawled at once (default: %(default)s)")
    _overwrite_option(p, "shards in --out crawled from another URL list or --shard-size",
                      "a rerun of the same list, or of it with URLs added at the end, resumes")
    p.add_argument("--allow-private", action="store_true",
                   help="allow private and loopback addresses (tests, intranets); link-local (169.254.0.0/16, the "
                   "cloud metadata range; fe80::/10), multicast, 0.0.0.0/8 and reserved ranges stay refused")
    p.add_argument("--allow-network", action="append", metavar="CIDR",
                   help="allow this network although it is not global, e.g. 10.1.0.0/16 or 169.254.169.254/32 "
                   "(repeatable; the only way to open link-local and the other special ranges)")
    p.set_defaults(func=cmd_crawl)


# --- ingest ---------------------------------------------------------------------------------

def cmd_ingest(args: argparse.Namespace) -> int:
    from curation.validate import ValidationConfig

    ws = resolve_workspace(args.workspace)
    config = ValidationConfig(max_image_bytes=args.max_image_bytes, max_pixels=args.max_pixels, min_side=args.min_side)
    try:
        summary, failed = stage_runner.run_ingest(ws, args.shards, config, args.source,
                                                  map_shards=stage_runner.process_pool(args.workers, desc="ingest"),
                                                  max_failure_fraction=args.max_failure_fraction), False
    except StageFailed as exc:  # printed below, after the work that did finish
        summary, failed = exc.summary, True
    print(f"ingest: {summary['ingested']} shard(s) ingested, {summary['skipped']} unchanged and skipped; "
          f"{summary['accepted']} accepted, {summary['rejected']} rejected" + _counts(summary["reasons"]))
    for spec in summary["missing"]:
        _error(f"no shard matches {spec}")
    for url, why in summary["failed"].items():
        _error(f"shard {url} failed: {why}")
    if summary["ingested"] + summary["skipped"] == 0 and (summary["missing"] or summary["failed"]):
        return 2
    return 1 if (summary["missing"] or failed) else 0


def add_ingest_parser(sub, ws: argparse.ArgumentParser) -> None:
    p = sub.add_parser("ingest", parents=[ws], help="validate crawled WebDataset shards and record them in the catalog",
                       description="Read shards (paths, directories, globs, brace patterns such as "
                       "'crawl/{00000..00099}.tar', fsspec URLs, or 'pipe:CMD'), fully decode every image, and record "
                       "each sample in the `samples` view or, with a reason, in `rejects`. Shards already ingested "
                       "with the same content and limits are skipped, so reruns and added shards are cheap.")
    p.add_argument("shards", nargs="+", metavar="SHARDS", help="shard paths, patterns or URLs")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="parallel processes (default: %(default)s)")
    p.add_argument("--source", default=None,
                   help="prefix for shard names, to tell apart crawls with the same file names")
    p.add_argument("--max-image-bytes", type=int, default=32 * 1024 * 1024,
                   help="largest image file accepted (default: 32 MiB)")
    p.add_argument("--max-pixels", type=int, default=40_000_000,
                   help="decompression-bomb guard: largest width*height decoded (default: %(default)s)")
    p.add_argument("--min-side", type=int, default=8, help="smallest width or height accepted (default: %(default)s)")
    p.add_argument("--max-failure-fraction", type=float, default=0.0,
                   help="exit 1 when more than this fraction of the shards failed (default: %(default)s, any failed "
                   "shard; every shard is tried first)")
    p.set_defaults(func=cmd_ingest)


# --- sql, refresh ---------------------------------------------------------------------------

MAX_QUERY_BYTES = 16 * 2**20  # a query read from a file or stdin


def _sql_text(args: argparse.Namespace) -> str:
    """The query: the argument, or the text of -f FILE, or stdin for `-` (argv caps a query at 128 KB)."""
    if (args.query is None) == (args.file is None):
        raise WebdistillError("give the query as an argument, or -f FILE, or '-' to read it from stdin")
    source = args.file if args.file is not None else ("-" if args.query == "-" else None)
    if source is None:
        return args.query
    try:
        if source == "-":
            data = sys.stdin.buffer.read(MAX_QUERY_BYTES + 1)
        else:
            with open(source, "rb") as f:
                data = f.read(MAX_QUERY_BYTES + 1)
        if len(data) > MAX_QUERY_BYTES:
            raise WebdistillError(f"the query in {source} is longer than {MAX_QUERY_BYTES} bytes")
        return data.decode("utf-8")
    except OSError as exc:
        raise WebdistillError(f"cannot read the query from {source}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise WebdistillError(f"the query in {source} is not UTF-8 text") from exc


def cmd_sql(args: argparse.Namespace) -> int:
    ws = resolve_workspace(args.workspace)
    sql = _sql_text(args)
    table_rows = 40 if args.max_rows is None else args.max_rows
    limits = user_sql.Limits(timeout_s=args.timeout, max_bytes=args.max_bytes, max_temp_bytes=args.max_temp_bytes,
                             max_rows=user_sql.USER_LIMITS.max_rows if args.max_rows is None else args.max_rows)
    if args.format != "table":
        _print_table(user_sql.query(ws, sql, limits), args)
        return 0
    # the rest is counted as it streams past (up to the csv/json row limit), never held
    table, total, more = user_sql.head(ws, sql, table_rows, limits, count_up_to=user_sql.USER_LIMITS.max_rows)
    _print_table(table, args)
    if more or total > table.num_rows:
        print(f"{'more than ' if more else ''}{total} rows{'' if more else ' in all'}; "
              f"the first {table.num_rows} shown (--max-rows)")
    return 0


def add_sql_parser(sub, ws: argparse.ArgumentParser) -> None:
    p = sub.add_parser("sql", parents=[ws], help="run read-only SQL against the catalog",
                       description="Run one read-only SELECT against catalog.duckdb. Views: "
                       + ", ".join(f"{k} ({v.description})" for k, v in catalog.VIEWS.items())
                       + "; candidates (samples with their clusters and latest scores, as of the last refresh); "
                       "tables: runs, selections, students, score_columns. Only a SELECT (or EXPLAIN of one) that "
                       "reads runs: writes, COPY, ATTACH, INSTALL/LOAD, SET, query() and files outside the workspace "
                       "are refused, whatever wraps them. Every query is bounded in time, output rows and bytes, and "
                       "temp space.")
    p.add_argument("query", nargs="?", default=None,
                   help='e.g. "SELECT reason, count(*) FROM rejects GROUP BY reason"; - reads it from stdin')
    p.add_argument("-f", "--file", default=None, help="read the query from FILE (- for stdin)")
    _output_options(p)
    p.add_argument("--max-rows", type=int, default=None,
                   help="rows shown by --format table (default: 40); the most rows csv/json output, past it the "
                   "query is refused (default: 100000)")
    p.add_argument("--max-bytes", type=int, default=catalog.USER_LIMITS.max_bytes,
                   help="the most bytes (Arrow) of output, past it the query is refused (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=catalog.USER_LIMITS.timeout_s,
                   help="seconds before the query is stopped (default: %(default)s)")
    p.add_argument("--max-temp-bytes", type=int, default=catalog.USER_LIMITS.max_temp_bytes,
                   help="temp space the query may spill to, removed after it (default: %(default)s)")
    p.set_defaults(func=cmd_sql)



def cmd_refresh(args: argparse.Namespace) -> int:
    ws = resolve_workspace(args.workspace)
    aside = catalog.rebuild(ws) if args.rebuild else catalog.refresh(ws)
    counts = catalog.query(ws, "SELECT (SELECT count(*) FROM samples) AS samples, (SELECT count(*) FROM selections) "
                               "AS selections, (SELECT count(*) FROM students) AS students").to_pylist()[0]
    print(f"refresh: catalog {ws.catalog_path} " + ("rebuilt" if args.rebuild else "refreshed")
          + f" from the artifacts: {counts['samples']} samples, {counts['selections']} selection(s), "
          f"{counts['students']} student(s)" + (f"; the old catalog is at {aside}" if aside else ""))
    return 0


def add_refresh_parser(sub, ws: argparse.ArgumentParser) -> None:
    p = sub.add_parser("refresh", parents=[ws], help="rebuild the catalog's views and tables from the artifacts",
                       description="Recreate catalog.duckdb's views over the workspace's artifacts (as every stage "
                       "does when it ends), and the rows of selections and students from their manifests and "
                       "summaries. With --rebuild, a damaged catalog is first set aside as "
                       "catalog.duckdb.<time>.bak and a new one is built; only the log of past runs is lost.")
    p.add_argument("--rebuild", action="store_true", help="set the catalog aside and build a new one")
    p.set_defaults(func=cmd_refresh)


# --- embed ----------------------------------------------------------------------------------

def cmd_embed(args: argparse.Namespace) -> int:
    ws = resolve_workspace(args.workspace)
    summary = stage_runner.run_embed(ws, args.embedder, args.pretrained, args.teacher, args.device, args.precision,
                                     args.batch_size, args.workers, args.trust_model_code, progress=True,
                                     feature_layers=args.feature_layers)
    if args.embedder.startswith("open_clip:") and not args.pretrained:
        print("embed: no --pretrained weights: the vectors come from a randomly initialised model", file=sys.stderr)
    rate = f" at {summary['samples'] / summary['seconds']:.0f} images/s" if summary["seconds"] else ""
    print(f"embed {summary['embedder']}: {summary['embedded']} shard(s), {summary['samples']} images{rate}; "
          f"{summary['skipped']} unchanged and skipped; vectors of dim {summary['dim']} in "
          f"{ws.root / 'embeddings' / summary['embedder']}")
    if summary["failed_images"]:
        _error(f"{summary['failed_images']} image(s) could not be read again (flagged ok=false)")
        return 1
    return 0


def add_embed_parser(sub, ws: argparse.ArgumentParser) -> None:
    p = sub.add_parser("embed", parents=[ws], help="embed every ingested image (open_clip or the teacher's features)",
                       description="Write one L2-normalised float16 .npy per shard, with its id map, under "
                       "embeddings/<embedder>/. Images are decoded in DataLoader workers, straight from the shards. "
                       "Shards already embedded with the same model and weights are skipped.")
    p.add_argument("--embedder", default="open_clip:ViT-S-32",
                   help="open_clip:<model name> (any open_clip model) or teacher (default: %(default)s)")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag or a local checkpoint path")
    p.add_argument("--teacher", default=None, help="teacher model spec, for --embedder teacher. " + MODEL_SPECS)
    p.add_argument("--feature-layers", default=None, metavar="LAYER,...",
                   help="--embedder teacher: the layers whose pooled outputs form the vector, each L2-normalised and "
                   "concatenated: module names as in named_modules() (layer4, features.12), NAME:input, or penultimate "
                   "(the classifier's input), for nn.Module, TorchScript and .pt2 teachers alike "
                   "(default: penultimate)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="decode workers, at idle priority (default: %(default)s)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="bf16 autocast is faster on CPUs with AMX/AVX512-BF16; fp16 applies on GPU (default: fp32)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    _trust_option(p)
    p.set_defaults(func=cmd_embed)


# --- index, knn, knn-score ------------------------------------------------------------------

def _index_config(args: argparse.Namespace):
    from curation.index import IndexConfig

    return IndexConfig(ivf_threshold=args.ivf_threshold, nlist=args.nlist, pq_m=args.pq_m, nprobe=args.nprobe,
                       dup_threshold=args.dup_threshold, kmeans_k=args.kmeans_k, verify=args.verify,
                       dup_max_crop=args.max_crop, dup_max_neighbors=args.dup_max_neighbors)


def cmd_index(args: argparse.Namespace) -> int:
    ws = resolve_workspace(args.workspace)
    config = _index_config(args)
    out = stage_runner.run_index(ws, args.embedder, config, workers=args.workers, say=_progress_line, progress=True)
    meta, dups = out["index"], out["dups"]
    print(f"index {meta['embedder']}: {meta['kind']} index of {meta['size']} vectors (dim {meta['dim']})"
          + (" unchanged" if meta["skipped"] else f" built in {meta['seconds']:.1f}s"))
    print(f"near-duplicates at cosine >= {config.dup_threshold}: {dups.get('clusters')} clusters, "
          f"{dups.get('duplicates')} samples that duplicate another; k-means: {out['kmeans_k']} clusters")
    if dups.get("capped_images"):
        print(f"near-duplicates: {dups['capped_images']} of {dups.get('images')} images have more than "
              f"{dups.get('max_neighbors')} look-alikes at cosine >= {config.dup_threshold}; only their nearest "
              f"{dups.get('max_neighbors')} were candidates (--dup-max-neighbors; column candidates_capped of `dups`)",
              file=sys.stderr)
    return 0


def add_index_parser(sub, ws: argparse.ArgumentParser) -> None:
    p = sub.add_parser("index", parents=[ws], help="FAISS index, near-duplicate clusters and k-means clusters",
                       description="Build a FAISS index over one embedder's vectors (exact IndexFlatIP below "
                       "--ivf-threshold vectors, IVF or IVF-PQ above), then near-duplicate clusters (each image's "
                       "nearest look-alikes, at most --dup-max-neighbors, checked on the pixels; identical bytes "
                       "always share a cluster) into the `dups` view and k-means clusters into `clusters`. Files open "
                       "with plain faiss.read_index and pyarrow.")
    _index_options(p)
    p.add_argument("--ivf-threshold", type=int, default=100_000, help="exact search below this many vectors")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default: about 4*sqrt(n))")
    p.add_argument("--pq-m", type=int, default=0, help="> 0: IVF-PQ with this many sub-quantizers")
    p.add_argument("--dup-threshold", type=float, default=0.95, help="cosine similarity of near-duplicates")
    p.add_argument("--dup-max-neighbors", type=int, default=32,
                   help="per image, at most this many nearest look-alikes are near-duplicate candidates; memory "
                   "and time grow with images x this (default: %(default)s)")
    p.add_argument("--kmeans-k", type=int, default=64, help="k-means clusters (default: %(default)s)")
    p.add_argument("--verify", choices=["pixels", "none"], default="pixels",
                   help="check candidate near-duplicate pairs on the pixels (crop/resize/re-encode tolerant) before "
                   "joining them; none: trust the embedding alone (default: %(default)s)")
    p.add_argument("--max-crop", type=float, default=0.08,
                   help="largest crop per side, as a fraction, that still counts as a near-duplicate "
                   "(default: %(default)s)")
    p.add_argument("--workers", type=int, default=2,
                   help="processes reading images for the pixel check (default: %(default)s)")
    p.set_defaults(func=cmd_index)



def _query_vectors(ws, name: str, args: argparse.Namespace):
    """The query vectors for --sample-id / --image / --text, and a label for each."""
    from curation.embedders import embedder_from_workspace
    from curation.index import vectors_of

    if args.sample_id:
        return vectors_of(ws, name, args.sample_id), list(args.sample_id)
    embedder = embedder_from_workspace(ws.root, name, trust_model_code=args.trust_model_code)
    if args.text:
        return embedder.encode_text(args.text).numpy(), list(args.text)
    return stage_runner.encode_image_files(embedder, args.image, strict=True), list(args.image)


def cmd_knn(args: argparse.Namespace) -> int:
    from curation.embedders import embedder_dir_name
    from curation.index import search

    ws = resolve_workspace(args.workspace)
    name = embedder_dir_name(args.embedder)
    queries, labels = _query_vectors(ws, name, args)
    hits = search(ws, name, queries, k=args.k, nprobe=args.nprobe)
    rows = [{"query": label, "rank": r + 1, "sample_id": sid, "similarity": round(sim, 4)}
            for label, found in zip(labels, hits) for r, (sid, sim) in enumerate(found)]
    if not rows:
        print("knn: no neighbours found", file=sys.stderr)
        return 1
    found = catalog.query(ws, "SELECT sample_id, shard, key, width, height, url, caption FROM samples "
                          "WHERE sample_id IN (SELECT unnest($ids::VARCHAR[]))",
                          params={"ids": sorted({r["sample_id"] for r in rows})}).to_pylist()
    meta = {m["sample_id"]: m for m in found}
    table = pa.Table.from_pylist([r | {k: v for k, v in meta.get(r["sample_id"], {}).items() if k != "sample_id"}
                                  for r in rows])
    _print_table(table, args, keep=("query", "rank", "sample_id", "similarity"))
    return 0


def add_knn_parser(sub, ws: argparse.ArgumentParser) -> None:
    p = sub.add_parser("knn", parents=[ws], help="nearest neighbours of a sample, an image file or a text",
                       description="Print the nearest samples with their catalog metadata.")
    _index_options(p)
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--sample-id", nargs="+", help="query by sample_id(s)")
    q.add_argument("--image", nargs="+", help="query by image file(s)")
    q.add_argument("--text", nargs="+", help="query by text (embedders with a text tower)")
    p.add_argument("-k", type=int, default=10, help="neighbours per query (default: %(default)s)")
    _output_options(p)
    _trust_option(p)  # a teacher embedder's model is loaded again to embed the queries
    p.set_defaults(func=cmd_knn)



def cmd_knn_score(args: argparse.Namespace) -> int:
    ws = resolve_workspace(args.workspace)
    result = stage_runner.run_knn_score(ws, args.name, args.embedder, args.k, prompts=args.prompts, sql=args.sql,
                                        images=args.images, trust_model_code=args.trust_model_code,
                                        overwrite=args.overwrite)
    print(f"knn-score {args.name}: {result['samples']} samples scored against {result['reference']} reference "
          f"vectors (k={result['k']}); column knn_sim in view knn_scores "
          f"WHERE name = {user_sql.sql_literal(args.name)}")
    return 0


def add_knn_score_parser(sub, ws: argparse.ArgumentParser) -> None:
    p = sub.add_parser("knn-score", parents=[ws], help="score every sample by its similarity to a reference set",
                       description="Mean cosine similarity of each sample to its k nearest reference vectors, "
                       "stored as knn_sim in the `knn_scores` view under --name (higher = closer).")
    _index_options(p)
    p.add_argument("--name", required=True, help="name of the score")
    r = p.add_mutually_exclusive_group(required=True)
    r.add_argument("--images", help="a folder of target images")
    r.add_argument("--prompts", nargs="+", help="class prompts, e.g. 'a photo of the digit 3'")
    r.add_argument("--sql", help="a query returning the sample_ids of the reference set")
    p.add_argument("-k", type=int, default=5, help="reference neighbours averaged (default: %(default)s)")
    _overwrite_option(p, "a kNN score of this name made from another reference set, --embedder or -k",
                      "the same ones are recomputed over the current pool")
    _trust_option(p)
    p.set_defaults(func=cmd_knn_score)


# --- score ----------------------------------------------------------------------------------

def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def cmd_score(args: argparse.Namespace) -> int:
    from curation.score import ScoreConfig

    ws = resolve_workspace(args.workspace)
    config = ScoreConfig(teacher=args.teacher, student=args.student, name=args.name, batch_size=args.batch_size,
                         workers=args.workers, odin=not args.no_odin, odin_temperature=args.odin_temperature,
                         odin_epsilon=args.odin_epsilon, kd3_alpha=args.kd3_alpha, kd3_tau=args.kd3_tau,
                         reference_confidence=args.reference_confidence, knn_k=args.knn_k, reference=args.reference,
                         reference_rounds=args.reference_rounds, reference_top=args.reference_top,
                         feature_layers=args.feature_layers, device=args.device or ("cuda" if _cuda() else "cpu"),
                         trust_model_code=args.trust_model_code)
    summary = stage_runner.run_score(ws, config, progress=True, overwrite=args.overwrite)
    rate = f" at {summary['samples'] / summary['seconds']:.0f} images/s" if summary["seconds"] else ""
    print(f"score {config.name}: {summary['scored']} shard(s), {summary['samples']} samples{rate}; "
          f"{summary['skipped']} unchanged and skipped; {_reference_line(summary.get('reference'))}. "
          f"Query them: webdistill sql \"SELECT * FROM candidates\" (columns: SELECT * FROM score_columns)")
    for note in summary.get("notes") or ():
        print(f"score {config.name}: note: {note}", file=sys.stderr)
    return 0


def _reference_line(ref: dict | None) -> str:
    if not ref:
        return "no reference set"
    classes = len(ref.get("per_class") or {})
    how = {"agreement": f"agreed on by several scores, {ref.get('rounds', 0)} refinement round(s)",
           "confidence": "the teacher's most confident"}.get(ref["kind"], f"images of {ref.get('source')}")
    return f"reference set: {ref['size']} samples over {classes} classes ({how})"


def add_score_parser(sub, ws: argparse.ArgumentParser) -> None:
    p = sub.add_parser("score", parents=[ws], help="score every sample with the teacher (and a student)",
                       description="Run the teacher (and, with --student, the student) over every ingested sample and "
                       "store per-sample scores in the `scores` view, all with higher = more in-distribution: MSP, max "
                       "logit, energy, negative entropy, GEN, ODIN, the BatchNorm-statistics score, Mahalanobis and "
                       "relative Mahalanobis, SCALE, ASH, ReAct, a fused rank of the label-free scores, kNN to the "
                       "reference set (--reference), the teacher's pseudo-label, "
                       "confidence and logits, and with a student agreement, KL, JS and the KD^3 combined "
                       "prediction. `SELECT * FROM score_columns` documents each. " + MODEL_SPECS)
    p.add_argument("--teacher", required=True, help="teacher model spec (see above)")
    p.add_argument("--student", default=None, help="student model spec, e.g. a distill run's student.json")
    p.add_argument("--name", default="default", help="name of the scoring run (default: %(default)s)")
    _overwrite_option(p, "a scoring run of this name made with another teacher, student or settings",
                      "the same ones resume, skipping unchanged shards; --device, --batch-size, --workers may differ")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="decode workers (default: %(default)s)")
    p.add_argument("--no-odin", action="store_true", help="skip ODIN (it costs a backward and a second forward pass)")
    p.add_argument("--odin-temperature", type=float, default=1000.0, help="ODIN temperature (default: %(default)s)")
    p.add_argument("--odin-epsilon", type=float, default=0.0014,
                   help="ODIN input step, in [0,1] pixel units (default: %(default)s)")
    p.add_argument("--kd3-alpha", type=float, default=0.5,
                   help="KD^3's teacher weight a in softmax(a*z_T+(1-a)*z_S) (default: %(default)s)")
    p.add_argument("--kd3-tau", type=float, default=0.95, help="KD^3 base threshold tau (default: %(default)s)")
    p.add_argument("--reference", default="agreement", metavar="agreement|confidence|DIR",
                   help="the reference set of Mahalanobis and kNN: samples several label-free scores agree on, refined "
                   "in rounds (agreement), the teacher's most confident (confidence), or a folder of target images "
                   "(class_name/*.png or flat; even 10 per class); docs/reference.md (default: %(default)s)")
    p.add_argument("--reference-rounds", type=int, default=2,
                   help="agreement: refinement rounds, each fitting class Gaussians, re-picking (default: %(default)s)")
    p.add_argument("--reference-top", type=float, default=0.01,
                   help="agreement: the reference set's size as a share of the pool (default: %(default)s)")
    p.add_argument("--reference-confidence", type=float, default=0.99,
                   help="--reference confidence: the teacher confidence of its samples (default: %(default)s)")
    p.add_argument("--knn-k", type=int, default=10, help="k of the kNN score (default: %(default)s)")
    p.add_argument("--feature-layers", default=None, metavar="LAYER,...",
                   help="the layers of mahalanobis_layers (pooled, one Mahalanobis each, averaged): module names as in "
                   "named_modules() (layer3, features.12), NAME:input, or penultimate (the classifier's input); "
                   "nn.Module, TorchScript and .pt2 teachers alike. A name the teacher lacks is an error that lists "
                   "its layers (default: penultimate and the last two stages)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    _trust_option(p)
    p.set_defaults(func=cmd_score)


# --- select, synthesize ---------------------------------------------------------------------

def cmd_select(args: argparse.Namespace) -> int:
    from curation.coverage import coverage_text
    from curation.select import SelectConfig

    ws = resolve_workspace(args.workspace)
    config = SelectConfig(name=args.name, sql=args.sql, policy=args.policy, limit=args.limit,
                          shard_size=args.shard_size, seed=args.seed, synthetic=tuple(args.synthetic or ()),
                          score_run=args.score_run)
    out = stage_runner.run_select(ws, config, overwrite=args.overwrite)
    status = "unchanged" if out["unchanged"] else f"written in {out['shards']} shard(s)"
    print(f"select {config.name}: {out['size']} samples ({coverage_text(out['coverage'])}) {status} at "
          f"{out['path']}; per class: {out['counts_per_class']}; scores from run {out['score_run']}")
    if out["policy"] == "default":
        print(f"select {config.name}: policy default = {out['policy_steps']}")
    for note in out["notes"]:
        print(f"select {config.name}: note: {note}", file=sys.stderr)
    if out["lost"]:
        _error(f"{out['lost']} chosen image(s) changed or vanished since ingest and were left out")
        return 1
    return 0


def _select_description() -> str:
    from curation import policies  # pandas: imported only for this help text

    return ("Choose samples from the `candidates` view (samples joined with near-duplicate and "
            "k-means clusters and the scores of one scoring run: --score-run, default the newest) and write "
            "them to selections/NAME/ as WebDataset shards (original image bytes, json with scores and "
            "weight, logits.npy, cls) with a manifest.json. Policies compose left to right with '|', "
            "a step's parameters with ';' (STEP:KEY=VALUE;KEY=VALUE). The steps, with their parameters "
            f"(KEY required; KEY=DEFAULT or [KEY] optional): {policies.synopsis()}. by= is any SQL "
            "expression over candidates' columns; balance takes k or per_class; softmax is "
            "related-first sampling (p ~ exp(s/tau)). Without --sql and --policy, the policy 'default' "
            "runs: dedup (near-duplicate clusters, else sha256), at most twice a fair share per k-means "
            "cluster, and a quota per pseudo-class (KD^3's combined prediction), best first by the fused "
            "score; --limit samples, else a tenth of the candidates. The output gives the class coverage "
            "(normalized class entropy, smallest class share). "
            "Example: --policy 'dedup | kd3 | balance:k=2000;by=msp'.")


def add_select_parser(sub, ws: argparse.ArgumentParser) -> None:
    p = sub.add_parser("select", parents=[ws],
                       help="pick samples by SQL and/or policies; write curated WebDataset shards",
                       description=_select_description)
    p.add_argument("--name", required=True, help="selection name (a folder under selections/)")
    p.add_argument("--sql", default=None, help='e.g. "SELECT sample_id FROM candidates WHERE msp > 0.9"')
    p.add_argument("--policy", default=None,
                   help="policies, applied in order after --sql (default: 'default' when --sql is not given either)")
    p.add_argument("--limit", type=int, default=None,
                   help="keep at most this many samples (the size of the default policy: default a tenth of the pool)")
    _overwrite_option(p, "a selection of this name made with another --sql/--policy/--limit/--seed/--synthetic",
                      "the same definition on new scores is simply brought up to date")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per curated shard (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random policies (default: %(default)s)")
    p.add_argument("--synthetic", nargs="+", default=None, metavar="NAME",
                   help="mix these synthetic sets (from `webdistill synthesize`) into the selection")
    p.add_argument("--score-run", default=None, metavar="RUN",
                   help="the scoring run (webdistill score --name) whose scores the candidates carry, in --sql too "
                   "(default: the newest finished run; the output names the one used)")
    p.set_defaults(func=cmd_select)



def cmd_synthesize(args: argparse.Namespace) -> int:
    from curation.synthesize import SynthConfig

    ws = resolve_workspace(args.workspace)
    config = SynthConfig(teacher=args.teacher, name=args.name, score_run=args.score_run, per_class=args.per_class,
                         conf_threshold=args.conf_threshold, search=args.search, seed=args.seed,
                         trust_model_code=args.trust_model_code)
    out = stage_runner.run_synthesize(ws, config, progress=True)
    print(f"synthesize {args.name}: {out['size']} images" + (" unchanged" if out["unchanged"] else "")
          + (f", {out['pass_rate']:.1%} of candidates passed confidence {args.conf_threshold}"
             if out["pass_rate"] is not None else "")
          + f"; per class {out['counts_per_class']}; in {out['path']}")
    return 0


def add_synthesize_parser(sub, ws: argparse.ArgumentParser) -> None:
    p = sub.add_parser("synthesize", parents=[ws], help="generate confident images per class (Nguyen et al.)",
                       description="Train a conditional VAE on the scored pool (conditioned on the teacher's "
                       "pseudo-labels), search its latent space for images the teacher classifies confidently, and "
                       "keep --per-class of them per class above --conf-threshold, as WebDataset shards under "
                       "synthetic/NAME/ (provenance synthetic). Mix them into a selection with "
                       "`webdistill select ... --synthetic NAME`.")
    p.add_argument("--teacher", required=True, help="teacher model spec. " + MODEL_SPECS)
    p.add_argument("--name", required=True, help="name of the synthetic set")
    p.add_argument("--per-class", type=int, default=100, help="images kept per class (default: %(default)s)")
    p.add_argument("--conf-threshold", type=float, default=0.9,
                   help="teacher confidence to keep an image (default: %(default)s)")
    p.add_argument("--score-run", default=None,
                   help="scoring run whose pseudo-labels train the cVAE (default: the latest)")
    p.add_argument("--search", choices=["gradient", "evolution"], default="gradient",
                   help="latent search: gradients through decoder and teacher, or black-box evolution "
                   "(default: gradient)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    _trust_option(p)
    p.set_defaults(func=cmd_synthesize)


# --- distill --------------------------------------------------------------------------------

def default_student_name(selection: str, student: str, loss: str) -> str:
    """SELECTION-STUDENT-LOSS, the student as a name can hold it (torchvision:resnet18 -> torchvision-resnet18,
    a spec file -> its stem), so runs of different students never share a folder."""
    student = student.split("@")[0]  # the weights file is not the architecture
    spec = Path(student)
    student = spec.stem if spec.suffix in (".json", ".pt2", ".pt", ".ts") else student
    return "-".join(re.sub(r"[^A-Za-z0-9._-]+", "-", part).strip("-.") for part in (selection, student, loss))


def cmd_distill(args: argparse.Namespace) -> int:
    ws = resolve_workspace(args.workspace)
    loss = json.loads(args.loss) if args.loss.startswith("{") else {"method": args.loss}
    options = {"student": args.student, "loss": loss,
               "teacher_mode": args.teacher_mode, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
               "nproc": args.nproc, "workers": args.loader_workers}
    if args.trust_model_code:
        options["trust_model_code"] = True
    # the job resolves relative paths against its config's folder: hand it absolute ones
    if args.teacher:
        options["teacher"] = _absolute_if_file(args.teacher)
    if args.eval:
        options["eval"] = _absolute_if_file(args.eval)
    name = args.name if args.name is not None else default_student_name(args.selection, args.student, loss["method"])
    summary = stage_runner.run_distill(str(ws.root), name, args.selection, options,
                                       init_from=_absolute_if_file(args.init_from) if args.init_from else None,
                                       stream=sys.stderr, overwrite=args.overwrite)
    acc = summary.get("eval_accuracy")
    print(f"distill {name}: {summary.get('steps')} steps in {summary.get('seconds', 0):.0f}s "
          f"on {summary.get('world_size')} process(es)" + (f"; eval accuracy {acc:.4f}" if acc is not None else "")
          + f"; student: {summary.get('checkpoint')}")
    return 0


def add_distill_parser(sub, ws: argparse.ArgumentParser) -> None:
    p = sub.add_parser("distill", parents=[ws], help="distil a student on a curated selection, under torchrun",
                       description="Write a job config under students/NAME/ and run `python -m distill.train` under "
                       "torchrun with --nproc processes (DDP: gloo on CPU, nccl on GPU). Checkpoints every few steps "
                       "and resumes after a crash when rerun; logs metrics.jsonl; exports student.pt (state_dict), "
                       "student.json (a spec that rebuilds it from the registry: `webdistill score --student` loads it "
                       "without trust) and student.pt2 (a torch.export program); records the run in `students`.")
    p.add_argument("--selection", required=True, help="a selection name (selections/NAME/manifest.json)")
    p.add_argument("--student", required=True, help="student architecture: tiny_cnn, small_cnn, torchvision:NAME, "
                   "timm:NAME, or module:factory (with --trust-model-code)")
    p.add_argument("--teacher", default=None,
                   help="teacher spec (default: the selection's; needed for --teacher-mode live)")
    p.add_argument("--teacher-mode", choices=["stored", "live"], default="stored",
                   help="stored: logits from the shards, no teacher forward; live: run the teacher (feature losses, "
                   "kd3, sakd)")
    p.add_argument("--loss", default="kd", help="kd, kd3, sakd, confidence_weighted, ce, or a JSON loss config "
                   "such as '{\"method\": \"kd\", \"T\": 2, "
                   "\"extra\": [{\"method\": \"confidence_weighted\", \"weight\": 0.5}]}'")
    p.add_argument("--nproc", type=int, default=1, help="processes (ranks) on this machine (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=10, help="epochs (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size per rank (default: %(default)s)")
    p.add_argument("--lr", type=float, default=0.05, help="learning rate (default: %(default)s)")
    p.add_argument("--loader-workers", type=int, default=1, help="DataLoader workers per rank (default: %(default)s)")
    p.add_argument("--eval", default=None, help="labelled WebDataset shards (image + cls) to evaluate on")
    p.add_argument("--init-from", default=None, help="start from these student weights (a previous round's student.pt)")
    p.add_argument("--name", default=None, help="run name (default: SELECTION-STUDENT-LOSS, e.g. digits-tiny_cnn-kd)")
    _overwrite_option(p, "a run of this name trained with another config or on other contents of the selection",
                      "the same job resumes")
    _trust_option(p)
    p.set_defaults(func=cmd_distill)


# --- report ---------------------------------------------------------------------------------

def cmd_report(args: argparse.Namespace) -> int:
    ws = resolve_workspace(args.workspace)
    summary = stage_runner.run_report(ws, args.out, args.selection, args.truth)
    print(f"report: {summary['path']} ({summary['bytes'] / 2**20:.1f} MiB, {len(summary['selections'])} selection(s), "
          f"{summary['thumbnails']} thumbnails, {summary['seconds']:.1f}s); open it in a browser: it needs no network")
    return 0


def add_report_parser(sub, ws: argparse.ArgumentParser) -> None:
    p = sub.add_parser("report", parents=[ws],
                       help="write a self-contained HTML report: plots, kept vs dropped, coverage",
                       description="One HTML file with everything embedded (plots, thumbnails from the shards' "
                       "original bytes): the pool (sources, formats, sizes, rejects, duplicates), score histograms "
                       "with each selection's cut, montages of the worst-scored kept and best-scored dropped images "
                       "per pseudo-class, near-duplicate clusters, each selection's class coverage and manifest, "
                       "and per round the selection and the student's accuracy and loss curves. With --truth, ROC "
                       "curves of the scores and the selections' precision.")
    p.add_argument("--out", default=None, help="the HTML file (default: WORKSPACE/report.html)")
    p.add_argument("--selection", nargs="+", default=None, metavar="NAME",
                   help="report these selections (default: all)")
    p.add_argument("--truth", default=None, metavar="PARQUET",
                   help="a ground truth: parquet with shard, key, in_domain (optional domain) for ROC and precision")
    p.set_defaults(func=cmd_report)


# --- the verbs that run Prefect flows -------------------------------------------------------

def _checked_config(args: argparse.Namespace):
    """The pipeline YAML checked whole (keys, policies, model specs, devices, input shards) before any
    stage runs or Prefect starts: a PipelineConfigError names the first bad key, in one line."""
    from flows.pipeline_check import validate_pipeline

    return validate_pipeline(args.config, trust_model_code=args.trust_model_code)


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _checked_config(args)
    if args.dry_run:
        return cmd_validate(args, cfg)
    from flows.pipeline import pipeline_flow

    result = pipeline_flow(args.config, trust_model_code=args.trust_model_code)
    for r in result["rounds"]:
        sel, student = r["selection"], r.get("student") or {}
        acc = student.get("eval_accuracy")
        print(f"round {r['round']}: selection {sel['name']} of {sel['size']} samples"
              + (f"; student eval accuracy {acc:.4f}" if acc is not None else ""))
    print("stage seconds: " + ", ".join(f"{stage} {sec:.1f}" for stage, sec in result["timings"].items()))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from curation.delete import delete

    ws = resolve_workspace(args.workspace)
    path = delete(ws, args.kind, args.name)
    print(f"delete: {args.kind} {args.name} removed ({path}); the catalog's views no longer list it")
    return 0


def add_delete_parser(sub, ws: argparse.ArgumentParser) -> None:
    from curation.delete import KINDS

    p = sub.add_parser("delete", parents=[ws], help="delete a selection, student, kNN score, scoring run or "
                       "synthetic set, with its catalog row",
                       description="Delete one named artifact: its folder (or file) under the workspace, its row in "
                       "`selections` or `students`, and its columns in the `candidates` view. Nothing outside the "
                       "workspace folder of that kind is touched. Students keep their selection_sha256, so a "
                       "deleted selection's students still say which data they trained on.")
    p.add_argument("kind", choices=list(KINDS), help="what to delete")
    p.add_argument("name", help="its name (webdistill sql \"SELECT name FROM selections\" lists selections)")
    p.set_defaults(func=cmd_delete)


def cmd_validate(args: argparse.Namespace, cfg=None) -> int:
    from flows.pipeline_plan import plan_text

    print(plan_text(cfg or _checked_config(args), args.config))
    return 0


def _pipeline_keys_epilog(p: argparse.ArgumentParser) -> None:
    """--help ends with the YAML's keys, generated from the stages' configs when help is asked for
    (building them imports the stage configs, which every other command line need not)."""
    shown = p.format_help

    def format_help() -> str:
        from flows.pipeline_config import keys_reference

        p.epilog = ("The YAML's keys (relative paths are relative to the YAML's folder; the README shows a whole "
                    "config):\n" + keys_reference())
        return shown()

    p.format_help = format_help


def _pipeline_parser(sub, verb: str, help: str, description: str) -> argparse.ArgumentParser:
    """A verb that reads a pipeline YAML: its argument, --trust-model-code and the YAML's keys in --help."""
    p = sub.add_parser(verb, help=help, formatter_class=argparse.RawDescriptionHelpFormatter, description=description)
    p.add_argument("config", help="pipeline YAML")
    _trust_option(p)  # or `trust_model_code: true` in the YAML
    _pipeline_keys_epilog(p)
    return p


def add_run_parser(sub, ws: argparse.ArgumentParser) -> None:
    p = _pipeline_parser(sub, "run", "run the whole pipeline from a YAML config as one Prefect flow, with rounds",
                         "Stages from the config (crawl, ingest, embed, index, score, select, distill),\n"
                         "as Prefect flows with per-shard tasks; rounds re-score with the latest student,\n"
                         "re-select and continue training. The whole config (keys, policies, model specs,\n"
                         "devices, input shards) is checked before any stage runs.")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config and print the plan (as `webdistill validate`); run nothing")
    p.set_defaults(func=cmd_run)


def add_validate_parser(sub, ws: argparse.ArgumentParser) -> None:
    p = _pipeline_parser(sub, "validate", "check a pipeline YAML whole and print what `run` would do",
                         "Check a pipeline YAML as `webdistill run` does before any work (keys, policies,\n"
                         "model specs without loading them, devices, input shards), then print the plan:\n"
                         "each stage and round, and what the workspace already holds for it (shards ingested\n"
                         "unchanged, shards embedded, scoring runs, selections, students). Runs nothing.")
    p.set_defaults(func=cmd_validate)


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.serve import build_deployments, serve_deployments

    deployments = build_deployments(args.config)
    names = [d.name for d in deployments]
    if not os.environ.get("PREFECT_API_URL"):
        print("no PREFECT_API_URL: Prefect starts a temporary server that lives only as long as this process "
              "(its address follows); for one that lasts, run `prefect server start` and set PREFECT_API_URL",
              flush=True)
    print(f"serving {', '.join(names)} (Ctrl-C stops; trigger one with: prefect deployment run 'FLOW/NAME')",
          flush=True)
    return serve_deployments(deployments)


def add_serve_parser(sub, ws: argparse.ArgumentParser) -> None:
    p = sub.add_parser("serve", help="serve the config's flows as Prefect deployments with cron schedules",
                       description="Register deployments for the config's `schedules` (crawl, curation, distill, "
                       "pipeline) and serve them until interrupted. With PREFECT_API_URL set they register on that "
                       "server; without it, on a temporary server that lives as long as this process.")
    p.add_argument("config", help="pipeline YAML with a `schedules` section")
    p.set_defaults(func=cmd_serve)



def cmd_demo(args: argparse.Namespace) -> int:
    from flows.demo import run_demo

    return run_demo(
        workspace=resolve_workspace(args.workspace), out=args.out, size=args.size, n_shards=args.shards,
        teacher_epochs=args.teacher_epochs, workers=args.workers, seed=args.seed, clip_steps=args.clip_steps,
        rounds=args.rounds, distill_epochs=args.distill_epochs,
    )


def add_demo_parser(sub, ws: argparse.ArgumentParser) -> None:
    p = sub.add_parser("demo", parents=[ws],
                       help="build the demo crawl and teacher offline, then run the whole pipeline (2 rounds)",
                       description="Build a crawl of real images (MNIST as the teacher's domain, mixed with "
                       "Fashion-MNIST, animal silhouettes, letters, natural-image crops and 8x8 digits) with planted "
                       "defects and duplicates, train a small teacher on a kept-aside MNIST split, ingest the crawl, "
                       "and train a small CLIP on its image-caption pairs (a user's --pretrained checkpoint). Then run "
                       "OUT/pipeline.yaml as one Prefect flow, as `webdistill run` would: embed, index, near-duplicate "
                       "and k-means clusters, and --rounds rounds of score, select and distil (torchrun, 2 processes), "
                       "each round re-scoring with the last student. Print what was found against the ground truth, "
                       "and per round the selection's size and precision and the student's accuracy.")
    p.add_argument("--out", default="demo", help="where the crawl, eval set and teacher go (default: %(default)s)")
    p.add_argument("--size", type=int, default=52_000, help="samples in the crawl (default: %(default)s)")
    p.add_argument("--shards", type=int, default=24, help="shards in the crawl (default: %(default)s)")
    p.add_argument("--teacher-epochs", type=int, default=20, help="teacher training epochs (default: %(default)s)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="parallel processes (default: %(default)s)")
    p.add_argument("--clip-steps", type=int, default=100,
                   help="training steps (of 256 pairs) for the demo's small CLIP (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="student-in-the-loop rounds (default: %(default)s)")
    p.add_argument("--distill-epochs", type=int, default=15, help="student epochs per round (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of everything random in the demo (default: %(default)s)")
    p.set_defaults(func=cmd_demo)


# --- the parser and main --------------------------------------------------------------------

VERBS = (add_crawl_parser, add_ingest_parser, add_sql_parser, add_refresh_parser, add_embed_parser, add_index_parser,
         add_knn_parser, add_knn_score_parser, add_score_parser, add_select_parser, add_synthesize_parser,
         add_distill_parser, add_report_parser, add_delete_parser, add_run_parser, add_validate_parser,
         add_serve_parser, add_demo_parser)  # in --help's order


def _version_line() -> str:
    """webdistill's version and its parts' (read from the installed packages' metadata: nothing imported)."""
    from importlib.metadata import PackageNotFoundError, version

    def of(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    parts = ("torch", "open_clip_torch", "faiss-cpu", "duckdb", "prefect", "webdataset")
    return f"webdistill {of('webdistill')} (" + ", ".join(f"{p} {of(p)}" for p in parts) + ")"


class _PrintVersion(argparse.Action):
    """--version as one line, unwrapped (grep-able in bug reports)."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(_version_line())
        parser.exit()


def _set_verbosity(args: argparse.Namespace) -> None:
    """Log levels before Prefect is imported (the verbs that run flows import it): by default a flow's
    own lines show and each task's INFO line does not; -v shows them, -vv debug, -q neither nor the
    progress bars (WEBDISTILL_PROGRESS=0, read by curation.progress)."""
    if args.quiet:
        os.environ["PREFECT_LOGGING_LEVEL"] = "ERROR"
        os.environ["WEBDISTILL_PROGRESS"] = "0"
    elif args.verbose >= 2:
        os.environ["PREFECT_LOGGING_LEVEL"] = "DEBUG"
    elif args.verbose == 0:
        os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL", "WARNING")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="webdistill",
        description="Curate a web crawl into a transfer set for a teacher, and distil a student on it. "
        "Every stage writes per-shard artifacts into the workspace; `catalog.duckdb` there has SQL views over all "
        "of them.",
    )
    parser.add_argument("--version", action=_PrintVersion, nargs=0,
                        help="print webdistill's version and those of the parts it runs on")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log lines: -v shows Prefect's per-task INFO lines, -vv its DEBUG lines")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="errors and each verb's result lines only: no progress bars, no Prefect log lines")
    sub = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser, metavar="VERB")
    ws = _workspace_parent()
    for add_parser in VERBS:
        add_parser(sub, ws)
    return parser


def _run(args: argparse.Namespace) -> int:
    """Run the verb; a workspace at an fsspec URL is mirrored locally and synced back after."""
    url = getattr(args, "workspace", None) or os.environ.get("WEBDISTILL_WORKSPACE")
    if not is_remote(url):
        return args.func(args)
    from curation.remote import synced

    with synced(url) as local:
        args.workspace = str(local)
        return args.func(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _set_verbosity(args)
    try:
        return _run(args)
    except WebdistillError as exc:  # distill's errors too; a failed job's reason is its first line
        _error(first_line(exc))
        return 2
    except KeyboardInterrupt:
        print("webdistill: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - last resort: still one line unless asked for more
        storage = storage_error(exc)  # a full disk or a folder it may not write, whichever stage hit it
        if storage is not None:
            _error(str(storage))
            return 2
        missing = missing_storage_package(exc)  # -w s3://... without s3fs: say what to install
        if missing is not None:
            _error(missing)
            return 2
        if os.environ.get("WEBDISTILL_DEBUG"):
            traceback.print_exc()
        print(f"webdistill: internal error: {exc.__class__.__name__}: {first_line(exc)} "
              "(WEBDISTILL_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
