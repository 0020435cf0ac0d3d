"""Thumbnails for the report: the samples' original bytes (each source shard read once, through
`shard_reader.stored_originals`, which checks them against the sha256 ingest recorded), shrunk and
embedded as data URIs. Only the samples a section shows are read, never the pool."""
from __future__ import annotations

import base64
import io
import warnings

import pandas as pd
from PIL import Image

from .errors import ShardReadError
from .shard_reader import stored_originals

THUMB_PX = 64


def _thumbnail(data: bytes, px: int) -> str | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ingest validated these bytes; PIL's chatter is not news
            with Image.open(io.BytesIO(data)) as im:
                im.draft("RGB", (px, px))  # JPEG: decode at a reduced scale
                im.thumbnail((px, px))
                if im.mode in ("RGBA", "LA", "P"):
                    rgba = im.convert("RGBA")
                    im = Image.new("RGB", rgba.size, "white")
                    im.paste(rgba, mask=rgba.getchannel("A"))
                else:
                    im = im.convert("RGB")
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=82)
    except Exception:  # noqa: BLE001 - an image that no longer decodes gets a blank tile, not a failed report
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def thumbnails(rows: pd.DataFrame, px: int = THUMB_PX) -> dict[str, str]:
    """{sample_id: JPEG data URI} for the rows (shard_url, key, ext, sha256, sample_id) that can
    still be read; a shard that cannot be opened only costs its own thumbnails."""
    rows = rows.drop_duplicates("sample_id")
    out: dict[str, str] = {}
    for _, group in rows.groupby("shard_url", sort=True):
        try:
            for row, data in stored_originals(group):
                uri = _thumbnail(data, px) if data is not None else None
                if uri is not None:
                    out[row["sample_id"]] = uri
        except ShardReadError:  # gone or refused since ingest (UnsafeShardURL is one)
            continue
    return out
