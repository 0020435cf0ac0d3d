"""Pixel checks for near-duplicate candidates: is one image a crop, resize or re-encode of the other?

An embedding proposes pairs that look alike; a class-level embedding also proposes distinct
images of one kind (two plain T-shirts), and connected components then chain them into huge
clusters. Pixels settle it:

- every sample is decoded once, shard by shard, into a small grayscale thumbnail;
- `descriptors` gives crop-tolerant vectors of the thumbnails, so an index can propose pairs too;
- `verify_pairs` aligns one thumbnail onto the other (a scale and a shift per axis, which is
  what a crop plus a resize does; Gauss-Newton, coarse to fine) and accepts the pair when the
  RMS difference over the central window is small next to the images' own fine detail
  (a relative residual: re-encoding noise grows with texture, while two distinct images of
  one kind differ by far more than their texture allows).

What is compared: luminance only, crops of up to `max_crop` per side, any resize, JPEG
re-encoding. Flips, rotations and colour changes are not near-duplicates here.
"""
from __future__ import annotations

import io
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from .errors import ShardReadError, WebdistillError
from .parallel import map_shards
from .progress import bar_disabled
from .shards import TruncatedShard, iter_samples, open_stored_shard

THUMB_SIDE = 64  # side of the stored grayscale thumbnails
DESCRIPTOR_SIDE = 16  # side of the blurred thumbnails an index searches
WINDOW_MARGIN = 0.125  # the compared window leaves this share of each side out, so the aligned window stays inside
# Coarse to fine: (side, Gauss-Newton steps, give up above this absolute RMS). The give-up levels sit
# well above what near-duplicates show at that level, so distinct pairs stop early and cost little.
LEVELS = ((8, 5, 0.10), (16, 4, 0.09), (32, 3, 0.05), (THUMB_SIDE, 2, None))
DETAIL_FLOOR = 0.01  # grey levels: flat images are judged against this much detail, not zero
MAX_CROP = 0.08  # default share of each side that a near-duplicate may have lost
MAX_RESIDUAL = 0.3  # default: near-duplicates measured below 0.25, distinct look-alikes mostly above 1
IDENTITY = (1.0, 0.0, 1.0, 0.0)  # warp parameters: scale_x, shift_x, scale_y, shift_y


class PixelCheckError(WebdistillError):
    """Images that cannot be decoded, or thumbnails of the wrong shape."""


def thumbnail(data: bytes, side: int = THUMB_SIDE) -> np.ndarray:
    """The image's luminance as a (side, side) uint8 array (aspect ratio not kept: alignment fixes it)."""
    try:
        im = Image.open(io.BytesIO(data))
        im.draft("L", (2 * side, 2 * side))  # JPEG: decode at a reduced scale, much faster
        return np.asarray(im.convert("L").resize((side, side), Image.BILINEAR, reducing_gap=2.0))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise PixelCheckError(f"cannot decode the image ({len(data)} bytes): {exc}") from exc


def _shard_thumbnails(job: tuple[str, dict[str, str], int]) -> dict[str, np.ndarray]:
    """Thumbnails of the wanted keys of one shard, read once from start to end."""
    url, wanted, side = job
    out: dict[str, np.ndarray] = {}
    try:
        with open_stored_shard(url) as stream:  # a URL from `samples`: data, never a command
            for sample in iter_samples(stream):
                ext = wanted.get(sample.key)
                if ext is not None and ext in sample.files:
                    try:
                        out[sample.key] = thumbnail(sample.files[ext], side)
                    except PixelCheckError:
                        continue  # this sample stays unverifiable; the others are fine
    except (TruncatedShard, ShardReadError):
        pass  # keep every sample read before the cut
    return out


def load_thumbnails(locations: list[tuple[str, str, str] | None], side: int = THUMB_SIDE, workers: int = 1,
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Thumbnails of samples given as (shard_url, key, ext): each shard is read once.

    Returns (thumbs (n, side, side) uint8, ok (n,) bool); `ok` is False where a sample is not
    located (None) or could not be read or decoded any more (its thumbnail is zeros)."""
    where: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    ext_of: dict[str, dict[str, str]] = defaultdict(dict)
    for row, location in enumerate(locations):
        if location is None:
            continue
        url, key, ext = location
        where[url][key].append(row)
        ext_of[url][key] = ext
    thumbs = np.zeros((len(locations), side, side), np.uint8)
    ok = np.zeros(len(locations), bool)
    jobs = [(url, ext_of[url], side) for url in sorted(where)]
    for (url, _, _), result in map_shards(_shard_thumbnails, jobs, workers=workers, desc="thumbnails",
                                          progress=progress):
        if isinstance(result, BaseException):
            continue  # a shard that fails as a whole leaves its samples unverifiable
        for key, thumb in result.items():
            rows = where[url][key]
            thumbs[rows], ok[rows] = thumb, True
    return thumbs, ok


def _as_batch(thumbs: np.ndarray) -> torch.Tensor:
    if thumbs.ndim != 3 or thumbs.shape[1] != thumbs.shape[2] or thumbs.shape[1] < 8:
        raise PixelCheckError(f"thumbnails must be (n, side, side) with side >= 8, got shape {thumbs.shape}")
    return torch.from_numpy(np.asarray(thumbs, dtype=np.float32) / 255).unsqueeze(1)


def _resize(x: torch.Tensor, side: int) -> torch.Tensor:
    return x if x.shape[-1] == side else F.interpolate(x, size=(side, side), mode="area")


def descriptors(thumbs: np.ndarray, side: int = DESCRIPTOR_SIDE) -> tuple[np.ndarray, np.ndarray]:
    """Blurred, L2-normalised (side*side) vectors of each whole thumbnail and of its centre
    (1/32 off each side). A crop of A matches A's centre: querying both against an
    index of the whole-image vectors finds crops in either direction."""
    x = _as_batch(thumbs)
    c = max(1, x.shape[-1] // 32)
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None]).div(16).view(1, 1, 3, 3)

    def blurred(y: torch.Tensor) -> np.ndarray:
        y = F.conv2d(F.pad(_resize(y, side), (1, 1, 1, 1), mode="replicate"), kernel).flatten(1)
        return np.ascontiguousarray(F.normalize(y, dim=1).numpy())

    return blurred(x), blurred(x[..., c:-c, c:-c])


def _grid(p: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling grid of the central window, mapped by p = (scale_x, shift_x, scale_y, shift_y)."""
    u = torch.linspace(-1 + 2 * WINDOW_MARGIN, 1 - 2 * WINDOW_MARGIN, side)
    gx = p[:, 0, None] * u + p[:, 1, None]
    gy = p[:, 2, None] * u + p[:, 3, None]
    grid = torch.stack([gx[:, None, :].expand(-1, side, -1), gy[:, :, None].expand(-1, -1, side)], -1)
    return grid, u


def _sample(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d/dx and d/dy per unit of normalised coordinates ([-1, 1] spans the image)."""
    half = (x.shape[-1] - 1) / 2
    gx, gy = torch.zeros_like(x), torch.zeros_like(x)
    gx[..., 1:-1] = (x[..., 2:] - x[..., :-2]) / 2
    gx[..., 0], gx[..., -1] = x[..., 1] - x[..., 0], x[..., -1] - x[..., -2]
    gy[..., 1:-1, :] = (x[..., 2:, :] - x[..., :-2, :]) / 2
    gy[..., 0, :], gy[..., -1, :] = x[..., 1, :] - x[..., 0, :], x[..., -1, :] - x[..., -2, :]
    return gx * half, gy * half


def _warp_limits(max_crop: float) -> tuple[float, float]:
    """Largest relative scale and shift (in half-widths) per axis between an image and a crop of it
    that lost up to `max_crop` of each side, whichever of the two is the crop."""
    return 1 / (1 - 2 * max_crop), max_crop / (1 - max_crop)


def _align(a: torch.Tensor, b_window: torch.Tensor, p: torch.Tensor, steps: int, max_crop: float) -> torch.Tensor:
    """Gauss-Newton on sum((A(warp_p) + bias - B)^2) over the window: p maps B's window into A,
    kept within what a crop of up to `max_crop` per side can do."""
    side = a.shape[-1]  # the window has as many samples per side as the level
    gx, gy = _gradients(a)
    stack = torch.cat([a, gx, gy], 1)  # one grid_sample warps the image and its gradients
    _, u = _grid(p, side)
    ux, uy = u.repeat(side), u.repeat_interleave(side)
    ridge = 1e-4 * torch.eye(5)
    max_scale, max_shift = _warp_limits(max_crop)
    for _ in range(steps):
        grid, _ = _grid(p, side)
        w = _sample(stack, grid).flatten(2)  # (n, 3, side*side): image, d/dx, d/dy
        wx, wy = w[:, 1], w[:, 2]
        jac = torch.stack([wx * ux, wx, wy * uy, wy, torch.ones_like(wx)], 1)  # (n, 5, P): scale, shift per axis, bias
        r = (b_window - w[:, 0]).unsqueeze(-1)
        step = torch.linalg.solve(jac @ jac.transpose(1, 2) + ridge, jac @ r)[:, :4, 0]
        p = p + step.clamp(-0.05, 0.05)
        p[:, 0::2] = p[:, 0::2].clamp(1 / max_scale, max_scale)
        p[:, 1::2] = p[:, 1::2].clamp(-max_shift, max_shift)
    return p


def _box3(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def _relative_residual(a_window: torch.Tensor, b_window: torch.Tensor) -> torch.Tensor:
    """RMS difference of the lightly blurred windows (resampling and JPEG noise live in the finest
    pixels) over the RMS of the finer window's own fine detail (what a 3x3 blur removes), floored
    so that flat images are judged on an absolute scale."""
    diff = (_box3(a_window) - _box3(b_window)).flatten(1).pow(2).mean(1).sqrt()
    detail = torch.maximum(*((w - _box3(w)).flatten(1).pow(2).mean(1).sqrt() for w in (a_window, b_window)))
    return diff / (detail.pow(2) + DETAIL_FLOOR**2).sqrt()


def pair_residuals(thumbs_a: np.ndarray, thumbs_b: np.ndarray, max_crop: float = MAX_CROP) -> np.ndarray:
    """Per pair: the relative residual between B's central window and A aligned onto it (see
    `_relative_residual`). Near-duplicates stay below about 0.25; distinct look-alikes reach 1 and more.

    Coarse to fine; a pair whose residual at a coarse level is already far from a near-duplicate's
    stops there and gets +inf."""
    if thumbs_a.shape != thumbs_b.shape:
        raise PixelCheckError(f"thumbnail batches differ in shape: {thumbs_a.shape} vs {thumbs_b.shape}")
    n = len(thumbs_a)
    out = np.full(n, np.inf, np.float32)
    alive = np.arange(n)
    p = torch.tensor(IDENTITY).repeat(n, 1)
    for side, steps, give_up in LEVELS:
        if len(alive) == 0:
            break
        # only the pairs still alive become float, a level at a time: fresh float copies of every
        # pair's full thumbnails cost more than the coarse levels' arithmetic (page faults)
        a, b = (_resize(_as_batch(t if len(alive) == n else t[alive]), min(side, t.shape[-1]))
                for t in (thumbs_a, thumbs_b))
        side = a.shape[-1]
        b_window = _sample(b, _grid(torch.tensor(IDENTITY).repeat(len(alive), 1), side)[0])
        p = _align(a, b_window.flatten(1), p, steps, max_crop)
        a_window = _sample(a, _grid(p, side)[0])
        if give_up is None:
            out[alive] = _relative_residual(a_window, b_window).numpy()
            break
        keep = (a_window - b_window).flatten(1).pow(2).mean(1).sqrt() <= give_up
        alive, p = alive[keep.numpy()], p[keep]
    return out


def verify_pairs(thumbs: np.ndarray, ok: np.ndarray, i: np.ndarray, j: np.ndarray,
                 max_residual: float = MAX_RESIDUAL, max_crop: float = MAX_CROP, chunk: int = 512,
                 progress: bool = False) -> np.ndarray:
    """Which candidate pairs (rows i[k], j[k] of `thumbs`) are near-duplicates on the pixels:
    relative residual at most `max_residual`. A pair with an unreadable side is never accepted.

    Chunks stay small (512 pairs: 8 MB of float thumbnails a side): memory the allocator must
    fault in fresh can cost more than the coarse levels' arithmetic."""
    accepted = np.zeros(len(i), bool)
    todo = np.flatnonzero(ok[i] & ok[j])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small ops per batch: measured 3-8x faster than 2 threads on 2 cores
    try:
        with torch.no_grad(), tqdm(total=len(todo), desc="pixel check", unit="pair",
                                   disable=bar_disabled(progress)) as bar:
            for start in range(0, len(todo), chunk):
                k = todo[start : start + chunk]
                accepted[k] = pair_residuals(thumbs[i[k]], thumbs[j[k]], max_crop) <= max_residual
                bar.update(len(k))
    finally:
        torch.set_num_threads(threads)
    return accepted
