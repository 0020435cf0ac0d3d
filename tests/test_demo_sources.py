"""The demo crawl's letters come from fonts every machine has (matplotlib's), so a fresh clone builds
the same crawl anywhere; each font must draw letters, not empty boxes."""
import hashlib

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from flows.demo.sources import LETTER_FONTS, _fonts, render_letter


def glyph(font_path: str, letter: str) -> np.ndarray:
    canvas = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(canvas).text((32, 32), letter, fill=255, font=ImageFont.truetype(font_path, 40), anchor="mm")
    return np.asarray(canvas)


def test_every_letter_font_is_found_and_draws_distinct_letters():
    fonts = _fonts()
    assert len(fonts) == len(LETTER_FONTS)
    for path in fonts:
        a, b = glyph(path, "A"), glyph(path, "g")
        assert (a > 0).sum() > 40 and (b > 0).sum() > 40, path  # ink, not an empty glyph
        assert not np.array_equal(a, b), path  # not one "missing glyph" box for every letter
    # fonts differ from each other: the domain has variety
    assert len({hashlib.sha256(glyph(p, "R").tobytes()).hexdigest() for p in fonts}) >= len(fonts) - 2


def test_letters_are_the_same_for_the_same_seed():
    def draw(seed: int) -> bytes:
        rng = np.random.default_rng(seed)
        return b"".join(render_letter(rng)[0].tobytes() for _ in range(30))
    assert draw(3) == draw(3) and draw(3) != draw(4)
