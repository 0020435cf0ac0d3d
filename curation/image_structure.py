"""What an image file's own structure says about its cost and completeness, read without decoding.

A decoder that runs out of data pads the rest and says nothing (libjpeg hits the EOI marker, zlib
ends its stream early, LZW sends its end code): the header then lies about the image. These walks
count what the decode will cost (JPEG scans) and check that the data can hold the pixels the header
promises, so `validate` can refuse before it spends a full decode.
"""
from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass, field

# A marker is 0xFF followed by anything but a stuffed zero or a restart marker (those stay in a scan).
_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7]")
_STANDALONE = {0x01, 0xD8, *range(0xD0, 0xD8)}
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_ARITHMETIC = {0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_LOSSLESS = {0xC3, 0xC7, 0xCB, 0xCF}
_PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}


class StructureError(ValueError):
    """The file promises more than its data can hold (reason) or would cost more than allowed."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass
class JpegScan:
    components: tuple[int, ...]
    ss: int
    ah: int
    data_bytes: int


@dataclass
class JpegLayout:
    width: int = 0
    height: int = 0
    sof: int | None = None
    sampling: dict[int, tuple[int, int]] = field(default_factory=dict)  # component id -> (h, v)
    scans: list[JpegScan] = field(default_factory=list)
    eoi: int | None = None  # offset of the EOI marker that ends the last scan
    complete: bool = False  # walked from SOI to EOI without a structural error

    def blocks(self, component: int) -> int:
        """8x8 blocks of one component (a lower bound: MCU padding only adds)."""
        h, v = self.sampling[component]
        hmax, vmax = self.mcu_size()
        cw, ch = -(-self.width * h * 8 // hmax), -(-self.height * v * 8 // vmax)
        return -(-cw // 8) * -(-ch // 8)

    def mcu_size(self) -> tuple[int, int]:
        return 8 * max(s[0] for s in self.sampling.values()), 8 * max(s[1] for s in self.sampling.values())


def jpeg_layout(data: bytes, max_scans: int, max_scan_pixels: int | None = None) -> JpegLayout:
    """Walk the markers. Raises StructureError("decode_budget") past `max_scans` scans or `max_scan_pixels`
    scans x pixels (each scan is a pass over every block: 20,000 empty scans take minutes), or past
    10,000 other segments (this walk is Python)."""
    out = JpegLayout()
    max_segments = 10_000 + max_scans
    pos, segments = 2, 0
    n = len(data)
    while pos + 1 < n:
        if data[pos] != 0xFF:
            return out  # not where a marker must be: PIL decides
        while pos + 1 < n and data[pos + 1] == 0xFF:  # fill bytes
            pos += 1
        if pos + 1 >= n:
            return out
        marker = data[pos + 1]
        segments += 1
        if segments > max_segments:
            raise StructureError("decode_budget", f"more than {max_segments} JPEG segments")
        if marker == 0xD9:
            out.eoi, out.complete = pos, out.sof is not None and bool(out.scans)
            return out
        if marker in _STANDALONE:
            pos += 2
            continue
        if pos + 4 > n:
            return out
        (length,) = struct.unpack_from(">H", data, pos + 2)
        body = data[pos + 4 : pos + 2 + length]
        if length < 2 or len(body) != length - 2:
            return out
        end = pos + 2 + length
        if marker in _SOF and out.sof is None and len(body) >= 6:
            out.sof = marker
            out.height, out.width, nf = struct.unpack_from(">HHB", body, 1)
            for i in range(nf):
                if 6 + 3 * i + 3 > len(body):
                    return out
                cid, hv = body[6 + 3 * i], body[7 + 3 * i]
                out.sampling[cid] = (max(hv >> 4, 1), max(hv & 15, 1))
        elif marker == 0xDA:
            if len(out.scans) >= max_scans:
                raise StructureError("decode_budget", f"more than {max_scans} JPEG scans (each one is a pass over "
                                                      "the whole image)")
            work = (len(out.scans) + 1) * out.width * out.height
            if max_scan_pixels is not None and work > max_scan_pixels:
                raise StructureError("decode_budget", f"{len(out.scans) + 1} scans of {out.width}x{out.height}: "
                                     f"more than {max_scan_pixels} scan-pixels to decode")
            ns = body[0] if body else 0
            if len(body) < 1 + 2 * ns + 3:
                return out
            comps = tuple(body[1 + 2 * i] for i in range(ns))
            ss, ahal = body[1 + 2 * ns], body[3 + 2 * ns]
            hit = _MARKER.search(data, end)
            stop = hit.start() if hit else n
            out.scans.append(JpegScan(comps, ss, ahal >> 4, stop - end))
            end = stop
        pos = end
    return out


def check_jpeg_data(layout: JpegLayout) -> None:
    """Raise StructureError("truncated_image") when the scans cannot hold the blocks the frame
    declares: every Huffman-coded block costs at least one bit for its DC and, in a sequential
    scan, one more for its end-of-block; every component needs a scan that codes its DC."""
    if not layout.complete or not layout.width or not layout.height or layout.sof in _ARITHMETIC | _LOSSLESS:
        return  # arithmetic coding can go below a bit per block; lossless has no blocks
    if not set(layout.sampling) or any(c not in layout.sampling for s in layout.scans for c in s.components):
        return
    progressive = layout.sof in _PROGRESSIVE
    covered: set[int] = set()
    blocks = {c: layout.blocks(c) for c in layout.sampling}
    for i, scan in enumerate(layout.scans):
        if progressive and scan.ss != 0:
            continue  # AC scans: one end-of-band run can cover 32,767 blocks
        if not progressive or scan.ah == 0:
            covered.update(scan.components)
        need_bits = sum(blocks[c] for c in scan.components) * (1 if progressive else 2)
        if scan.data_bytes * 8 < need_bits:
            raise StructureError("truncated_image", f"scan {i} holds {scan.data_bytes} bytes; its "
                                 f"{layout.width}x{layout.height} frame needs at least {-(-need_bits // 8)}")
    missing = set(layout.sampling) - covered
    if missing:
        raise StructureError("truncated_image", f"no scan codes component(s) {sorted(missing)}")


def jpeg_refill(data: bytes, layout: JpegLayout, filler: bytes = b"\x55" * 64) -> bytes:
    """The same file with bytes inserted before its EOI. A complete last scan ignores them; a scan
    that libjpeg had to pad decodes them instead, so the two decodes differ."""
    assert layout.eoi is not None
    return data[: layout.eoi] + filler + data[layout.eoi :]


def check_webp_size(data: bytes) -> None:
    """Raise StructureError("truncated_image") when a WebP file is shorter than its RIFF header says."""
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        declared = struct.unpack_from("<I", data, 4)[0] + 8
        if len(data) < declared:
            raise StructureError("truncated_image", f"{len(data)} bytes of a {declared}-byte WebP file")


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def png_interlaced(data: bytes) -> bool:
    return len(data) >= 29 and data[12:16] == b"IHDR" and data[28] == 1


def check_png_rows(data: bytes) -> None:
    """Raise StructureError("truncated_image") when the IDAT stream inflates to fewer bytes than
    the header's rows need (a complete zlib stream that ends early leaves the rest of the image black)."""
    if len(data) < 33 or data[12:16] != b"IHDR":
        return
    width, height, depth, color, _, _, interlace = struct.unpack_from(">IIBBBBB", data, 16)
    channels = _PNG_CHANNELS.get(color)
    if channels is None:
        return
    bits = channels * depth

    def row_bytes(w: int) -> int:
        return 1 + -(-w * bits // 8)

    if interlace:
        need = 0
        for x0, y0, dx, dy in _ADAM7:
            pw, ph = -(-(width - x0) // dx), -(-(height - y0) // dy)
            if pw > 0 and ph > 0:
                need += ph * row_bytes(pw)
    else:
        need = height * row_bytes(width)
    inflater, got, pos, seen_idat = zlib.decompressobj(), 0, 8, False
    while pos + 8 <= len(data) and got < need:
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"IDAT":
            seen_idat = True
            piece = data[pos + 8 : pos + 8 + length]
            while piece and got < need:
                try:
                    got += len(inflater.decompress(piece, 1 << 20))
                except zlib.error:
                    return  # corrupt, not short: the decoder has said so already
                piece = inflater.unconsumed_tail
        elif seen_idat:
            break
        pos += 12 + length
    if got < need:
        raise StructureError("truncated_image", f"the pixel data inflates to {got} bytes; "
                             f"{width}x{height} needs {need}")


def check_gif_data(data: bytes) -> None:
    """Raise StructureError("truncated_image") when the first frame's LZW data is too short for
    its declared size: n codes (2 bits at the least) decode to at most n(n+1)/2 pixels until the
    4,096-entry table is full, 4,096 per code after."""
    if len(data) < 13 or data[:3] != b"GIF":
        return
    pos = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
    while pos < len(data):
        kind = data[pos]
        if kind == 0x21:  # extension: label, then sub-blocks
            pos += 2
            while pos < len(data) and data[pos]:
                pos += data[pos] + 1
            pos += 1
        elif kind == 0x2C:
            if pos + 10 > len(data):
                return
            w, h, flags = struct.unpack_from("<HHB", data, pos + 5)
            pos += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0) + 1
            size = 0
            while pos < len(data) and data[pos]:
                size += data[pos]
                pos += data[pos] + 1
            codes = size * 8 // 2
            first = min(codes, 4096)
            most = first * (first + 1) // 2 + first + max(codes - 4096, 0) * 4096
            if w * h > most:
                raise StructureError("truncated_image", f"the first frame's {size} bytes of data decode "
                                     f"to at most {most} pixels; it declares {w}x{h}")
            return
        else:
            return
