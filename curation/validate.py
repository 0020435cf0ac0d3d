"""Image validation: structure checks, a decompression-bomb guard and size limits, then a full decode.

Limits on the tar members around the image (json, txt, anything else) and on a shard's layout
are here too, so one config says everything ingest refuses and is hashed into its commit record.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError
from pydantic import NonNegativeInt, PositiveInt

from .errors import WebdistillError
from .image_structure import (
    StructureError,
    check_gif_data,
    check_jpeg_data,
    check_png_rows,
    check_webp_size,
    jpeg_layout,
    jpeg_refill,
    png_interlaced,
)
from .stage_config import stage_config

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
MiB = 1024 * 1024


class ValidationConfigError(WebdistillError):
    """An ingest limit out of its range."""


@stage_config(ValidationConfigError, "validation config: ")
class ValidationConfig:
    max_image_bytes: PositiveInt = 32 * MiB
    max_pixels: PositiveInt = 40_000_000  # width * height, checked from the header before decoding
    min_side: NonNegativeInt = 8
    max_side: PositiveInt = 16_384
    formats: tuple[str, ...] = ("jpeg", "png", "webp", "gif", "bmp", "tiff")
    # every tar member is bounded by its declared size before a byte of it is read
    max_json_bytes: PositiveInt = 1 * MiB
    max_txt_bytes: PositiveInt = 1 * MiB
    max_other_bytes: PositiveInt = 4 * MiB  # any other extension (cls, npy, ...)
    max_members_per_sample: PositiveInt = 16
    max_key_length: PositiveInt = 512  # characters of a sample's key
    max_members_per_shard: PositiveInt = 1_000_000
    # decode budget: counted before decoding, then enforced by the kernel in the decode process
    max_jpeg_scans: PositiveInt = 100  # encoders write 1 to ~12; each scan is a pass over the whole image
    max_jpeg_scan_pixels: PositiveInt = 1_000_000_000  # scans x pixels: 25 scans at 40 MP, 100 at 10 MP (~0.3 s)
    decode_cpu_seconds: PositiveInt = 10  # per image (RLIMIT_CPU granularity: whole seconds)
    decode_memory_bytes: PositiveInt = 2048 * MiB  # address space of the decode process

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def member_limit(self, ext: str) -> int:
        """The most bytes a member with this extension may declare (`seg.png` counts as png)."""
        last = ext.rsplit(".", 1)[-1]
        if last in IMAGE_EXTS:
            return self.max_image_bytes
        return {"json": self.max_json_bytes, "txt": self.max_txt_bytes}.get(last, self.max_other_bytes)


@dataclass
class ImageInfo:
    width: int
    height: int
    format: str
    mode: str


@dataclass
class Rejected(Exception):
    reason: str
    detail: str = field(default="")


def validate_image(data: bytes, config: ValidationConfig) -> ImageInfo:
    """Return the image's facts, or raise Rejected with a reason from a fixed vocabulary:
    too_large, not_an_image, unsupported_format, decompression_bomb, too_small, decode_budget,
    truncated_image, corrupt_image.

    This bounds what can be counted before decoding (bytes, pixels, JPEG scans); the CPU time and
    memory of the decode itself are bounded by running it in a `DecodeSandbox`."""
    if len(data) > config.max_image_bytes:
        raise Rejected("too_large", f"{len(data)} bytes > {config.max_image_bytes}")
    try:
        with warnings.catch_warnings():
            # PIL's own bomb check is a warning below 2x its limit; ours is stricter and exact.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            check_webp_size(data)  # libwebp cannot even open a cut file: say why
            im = Image.open(io.BytesIO(data))
            fmt = (im.format or "").lower()
            w, h = im.size
            if fmt not in config.formats:
                raise Rejected("unsupported_format", fmt or "unknown")
            if w * h > config.max_pixels or max(w, h) > config.max_side:
                raise Rejected("decompression_bomb", f"{w}x{h} > {config.max_pixels} px or side > {config.max_side}")
            if min(w, h) < config.min_side:
                raise Rejected("too_small", f"{w}x{h}")
            layout = jpeg_layout(data, config.max_jpeg_scans, config.max_jpeg_scan_pixels) if fmt == "jpeg" else None
            if layout is not None:
                check_jpeg_data(layout)  # a header that promises more blocks than the scans hold
            elif fmt == "gif":
                check_gif_data(data)
            im.verify()  # checksums: catches PNG corruption a lenient decoder would let through
            im = Image.open(io.BytesIO(data))  # verify() leaves the image unusable; open it again
            im.load()  # a full decode, not only the header
            _check_not_padded(data, im, fmt, layout)
            return ImageInfo(width=w, height=h, format=fmt, mode=im.mode)
    except Rejected:
        raise
    except StructureError as exc:
        raise Rejected(exc.reason, str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise Rejected("not_an_image", _head(data)) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise Rejected("decompression_bomb", str(exc)) from exc
    except MemoryError as exc:  # the decode process's address-space limit
        raise Rejected("decode_budget", f"MemoryError: more than {config.decode_memory_bytes} bytes") from exc
    except Exception as exc:  # noqa: BLE001 - any failure of a decoder on untrusted bytes is the image's fault
        reason = "truncated_image" if "truncated" in str(exc).lower() else "corrupt_image"
        raise Rejected(reason, f"{exc.__class__.__name__}: {exc}") from exc


def _check_not_padded(data: bytes, im: Image.Image, fmt: str, layout) -> None:
    """Raise StructureError when the decoder filled in pixels the file does not hold. Padding
    leaves a signature (libjpeg: blocks of luma exactly 128 up to the last; zlib: the last row all
    zero) that a real image can share, so the signature only triggers an exact check."""
    w, h = im.size
    if fmt == "jpeg" and layout is not None and layout.complete and im.mode in ("L", "RGB"):
        # luma recomputed from RGB is the coded luma within rounding, whatever the chroma did
        last_block = im.crop(((w - 1) // 8 * 8, (h - 1) // 8 * 8, w, h)).convert("L")
        if sum(last_block.histogram()[127:130]) == last_block.width * last_block.height:
            for filler in (b"\x55" * 64, b"\xa3" * 64):  # two patterns: one of them decodes to non-zero
                again = Image.open(io.BytesIO(jpeg_refill(data, layout, filler)))
                again.load()
                if again.tobytes() != im.tobytes():
                    raise StructureError("truncated_image", "the scan data ends before the last block "
                                         "(libjpeg padded the rest with grey)")
    elif fmt == "png" and (png_interlaced(data) or not any(im.crop((0, h - 1, w, h)).tobytes())):
        check_png_rows(data)


def _head(data: bytes) -> str:
    return "starts with " + repr(data[:16])
