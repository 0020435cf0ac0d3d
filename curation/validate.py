"""Image validation: a full decode behind a decompression-bomb guard and size limits."""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")


@dataclass(frozen=True)
class ValidationConfig:
    max_image_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 40_000_000  # width * height, checked from the header before decoding
    min_side: int = 8
    max_side: int = 16_384
    formats: tuple[str, ...] = ("jpeg", "png", "webp", "gif", "bmp", "tiff")

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


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
    too_large, not_an_image, unsupported_format, decompression_bomb, too_small,
    truncated_image, corrupt_image."""
    if len(data) > config.max_image_bytes:
        raise Rejected("too_large", f"{len(data)} bytes > {config.max_image_bytes}")
    try:
        with warnings.catch_warnings():
            # PIL's own bomb check is a warning below 2x its limit; ours is stricter and exact.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            fmt = (im.format or "").lower()
            w, h = im.size
            if fmt not in config.formats:
                raise Rejected("unsupported_format", fmt or "unknown")
            if w * h > config.max_pixels or max(w, h) > config.max_side:
                raise Rejected("decompression_bomb", f"{w}x{h} > {config.max_pixels} px or side > {config.max_side}")
            if min(w, h) < config.min_side:
                raise Rejected("too_small", f"{w}x{h}")
            im.verify()  # checksums: catches PNG corruption a lenient decoder would let through
            im = Image.open(io.BytesIO(data))  # verify() leaves the image unusable; open it again
            im.load()  # a full decode, not only the header
            return ImageInfo(width=w, height=h, format=fmt, mode=im.mode)
    except Rejected:
        raise
    except UnidentifiedImageError as exc:
        raise Rejected("not_an_image", _head(data)) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise Rejected("decompression_bomb", str(exc)) from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError) as exc:
        reason = "truncated_image" if "truncated" in str(exc).lower() else "corrupt_image"
        raise Rejected(reason, f"{exc.__class__.__name__}: {exc}") from exc


def _head(data: bytes) -> str:
    return "starts with " + repr(data[:16])
