"""Builders of hostile shards and images, for the security tests and the fuzz test."""
from __future__ import annotations

import io
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from curation.image_structure import jpeg_layout

from .conftest import encode, noise_image


def _sof_offset(data: bytes) -> int:
    pos = 2
    while data[pos + 1] not in (0xC0, 0xC1, 0xC2):
        pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]
    return pos


def jpeg_header_lie(width: int = 6000, height: int = 6000) -> bytes:
    """A small real JPEG whose frame header claims width x height (libjpeg would pad the rest)."""
    data = bytearray(encode(noise_image(7, (16, 16)), "JPEG", quality=50))
    pos = _sof_offset(bytes(data))
    data[pos + 5 : pos + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def jpeg_cut_with_eoi(data: bytes, fraction: float | None = None, at: int | None = None) -> bytes:
    """The first `fraction` (or `at` bytes) of a JPEG, ended with a proper EOI marker: structurally complete."""
    return data[: at if at is not None else int(len(data) * fraction)] + b"\xff\xd9"


def jpeg_many_scans(side: int, extra_scans: int) -> bytes:
    """A progressive JPEG with its last scan repeated: each repeat is a few bytes and one more pass
    over every block (the 20,000-empty-scan attack)."""
    data = encode(np.zeros((side, side), np.uint8), "JPEG", progressive=True)
    layout = jpeg_layout(data, max_scans=10**6)
    last = data.rindex(b"\xff\xda")
    return data[:last] + data[last : layout.eoi] * (1 + extra_scans) + data[layout.eoi :]


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_short_stream(width: int, height: int, rows: int) -> bytes:
    """A PNG whose header says width x height but whose (valid, complete) zlib stream holds only
    `rows` rows: every chunk checksum is right, and PIL fills the rest with black."""
    row = np.random.default_rng(rows).integers(0, 256, width * 3, dtype=np.uint8).tobytes()
    raw = b"".join(b"\x00" + row for _ in range(rows))
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b""))


def gif_header_lie(width: int, height: int) -> bytes:
    """A 16x16 GIF whose screen and frame descriptors claim width x height."""
    data = bytearray(encode(noise_image(3, (16, 16))[:, :, 0], "GIF"))
    pos = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
    while data[pos] == 0x21:  # extensions before the image
        pos += 2
        while data[pos]:
            pos += data[pos] + 1
        pos += 1
    data[6:10] = struct.pack("<HH", width, height)
    data[pos + 5 : pos + 9] = struct.pack("<HH", width, height)
    return bytes(data)


def member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tuple:
    return name, data, kind, linkname


def raw_tar(path: Path, members: list[tuple], fmt: int = tarfile.GNU_FORMAT) -> Path:
    """A tar with exactly these members, any type, any name (tarfile's writer, no checks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data, kind, linkname in members:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, linkname
            info.size = len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
            tar.addfile(info, io.BytesIO(data) if info.size else None)
    return path


def huge_member_tar(path: Path, declared: int, after: list[tuple[str, bytes]] = (), name: str = "000.jpg",
                    sparse: bool = True, kind: bytes = tarfile.REGTYPE) -> Path:
    """A tar whose first member declares `declared` bytes. sparse: the file really is that long,
    with a hole (zeros, no disk) for the member's data, then the `after` members. Otherwise the
    header is followed by the `after` members at once, so the declared size overruns the file.
    `kind` may be a header extension (GNU long name, pax record) that tarfile reads whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        info = tarfile.TarInfo(name)
        info.size, info.type = declared, kind
        fh.write(info.tobuf(format=tarfile.GNU_FORMAT))
        if sparse:
            fh.seek(512 + -(-declared // 512) * 512)
        for member_name, data in after:
            info = tarfile.TarInfo(member_name)
            info.size = len(data)
            fh.write(info.tobuf(format=tarfile.GNU_FORMAT) + data + bytes(-len(data) % 512))
        fh.write(bytes(1024))
    return path


def valid_images() -> dict[str, bytes]:
    """One small valid image per format the fuzz test mutates."""
    photo = noise_image(11, (40, 32))
    return {"jpg": encode(photo, "JPEG", quality=80), "png": encode(photo, "PNG"),
            "webp": encode(photo, "WEBP"), "gif": encode(photo[:, :, 0], "GIF"),
            "progressive.jpg": encode(photo, "JPEG", progressive=True)}


def decoded(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im
