"""The report's HTML: one self-contained page (inline CSS, images as data URIs, no script, no link
to anything outside it). Small builders that escape every piece of text they are given, since
captions, URLs and names come from the crawl."""
from __future__ import annotations

import html
from dataclasses import dataclass

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
header{background:#1d2b3a;color:#fff;padding:18px 28px}header h1{margin:0 0 4px;font-size:22px}
header p{margin:0;color:#c8d3de;font-size:13px}
nav{padding:8px 28px;background:#eef1f4;border-bottom:1px solid #dde2e7;font-size:13px}
nav a{margin-right:14px;color:#1d4f8c;text-decoration:none}
main{padding:8px 28px 40px;max-width:1180px}
section{background:#fff;border:1px solid #e3e6ea;border-radius:6px;padding:14px 18px;margin:16px 0}
h2{font-size:18px;margin:0 0 10px}h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px}
th,td{border-bottom:1px solid #e7e9ec;padding:3px 10px 3px 0;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.note{color:#6b4e00;background:#fff7e0;border-left:3px solid #e0b000;padding:6px 10px;margin:8px 0}
.plots{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}.plots img{max-width:100%;height:auto}
img.wide{max-width:100%;height:auto}
.montage{display:grid;gap:6px 14px;align-items:start;margin:6px 0 14px}
.montage .head{font-weight:600;font-size:12px;color:#555}
.montage .label{font-size:12px}.tiles{display:flex;flex-wrap:wrap;gap:3px}
figure.t{margin:0;width:56px;text-align:center}
figure.t img{width:56px;height:56px;object-fit:contain;background:#f0f0f0;image-rendering:pixelated;display:block}
figure.t figcaption{font-size:10px;color:#555;font-variant-numeric:tabular-nums}
figure.t.missing img{visibility:hidden}
code{font-size:12px;background:#f3f4f6;padding:1px 4px;border-radius:3px;overflow-wrap:anywhere}
"""


def esc(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


@dataclass
class Section:
    id: str
    title: str
    body: str


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def para(text: str) -> str:
    return f"<p>{esc(text)}</p>"


def heading(text: str) -> str:
    return f"<h3>{esc(text)}</h3>"


def code(text: object) -> str:
    return f"<code>{esc(text)}</code>"


def _cell(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return f"<td>{esc('' if value is None else value)}</td>"
    if isinstance(value, int):
        return f'<td class="n">{value:,}</td>'
    if isinstance(value, float):
        return f'<td class="n">{value:.4g}</td>' if value == value else '<td class="n">–</td>'
    return f"<td>{esc(value)}</td>"


def table(headers: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def image(uri: str, alt: str, wide: bool = False) -> str:
    return f'<img src="{esc(uri)}" alt="{esc(alt)}"{" class=wide" if wide else ""}>'


def plots(images: list[str]) -> str:
    return f'<div class="plots">{"".join(images)}</div>'


def tile(uri: str | None, caption: str, title: str) -> str:
    """One thumbnail with a short caption; a sample whose bytes are gone keeps its place, blank."""
    if uri is None:
        return (f'<figure class="t missing" title="{esc(title)}"><img alt="">'
                f"<figcaption>{esc(caption)}</figcaption></figure>")
    return (f'<figure class="t" title="{esc(title)}"><img src="{esc(uri)}" alt="{esc(title)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def tiles(items: list[str], kind: str = "") -> str:
    """A row of tiles; `kind` (e.g. kept, dropped) is a class a reader of the page can pick them by."""
    return f'<div class="tiles{" " + esc(kind) if kind else ""}">{"".join(items)}</div>'


def montage(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """A grid: per row a label (HTML), then one cell per group of tiles (e.g. kept, dropped)."""
    cells = "".join(f'<div class="head">{esc(h)}</div>' for h in headers)
    for label, *groups in rows:
        cells += f'<div class="label">{label}</div>' + "".join(f"<div>{g}</div>" for g in groups)
    columns = f"150px repeat({len(headers) - 1}, 1fr)"
    return f'<div class="montage" style="grid-template-columns:{columns}">{cells}</div>'


def page(title: str, subtitle: str, sections: list[Section]) -> str:
    nav = "".join(f'<a href="#{esc(s.id)}">{esc(s.title)}</a>' for s in sections)
    body = "".join(f'<section id="{esc(s.id)}"><h2>{esc(s.title)}</h2>{s.body}</section>' for s in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
            f"<body><header><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></header><nav>{nav}</nav>"
            f"<main>{body}</main></body></html>\n")
