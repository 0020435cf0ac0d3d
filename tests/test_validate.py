import pytest

from curation.validate import Rejected, ValidationConfig, validate_image
from flows.demo.crawl import decompression_bomb_png

from .conftest import encode, noise_image

CFG = ValidationConfig()


def reason(data: bytes, cfg: ValidationConfig = CFG) -> str:
    with pytest.raises(Rejected) as err:
        validate_image(data, cfg)
    return err.value.reason


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_valid_images_give_their_facts(fmt):
    info = validate_image(encode(noise_image(1, (64, 48)), fmt), CFG)
    assert (info.width, info.height, info.format) == (64, 48, fmt.lower())


def test_each_defect_has_its_reason():
    jpeg = encode(noise_image(2), "JPEG")
    png = encode(noise_image(3), "PNG")
    assert reason(jpeg[: len(jpeg) // 2]) == "truncated_image"
    garbled = png[: len(png) // 2] + bytes(256) + png[len(png) // 2 + 256 :]
    assert reason(garbled) == "corrupt_image"
    assert reason(b"<html><body>404</body></html>") == "not_an_image"
    assert reason(b"") == "not_an_image"
    assert reason(encode(noise_image(4, (4, 4)), "PNG")) == "too_small"
    assert reason(jpeg, ValidationConfig(max_image_bytes=100)) == "too_large"
    assert reason(encode(noise_image(5), "TIFF"), ValidationConfig(formats=("jpeg", "png"))) == "unsupported_format"


def test_decompression_bomb_is_refused_from_its_header():
    bomb = decompression_bomb_png(20_000)
    assert len(bomb) < 200_000  # tiny on disk ...
    assert reason(bomb) == "decompression_bomb"  # ... refused before 400 MP are decoded
    # just under the limit passes the guard and decodes
    small = decompression_bomb_png(2_000)
    assert validate_image(small, ValidationConfig(max_pixels=4_000_000)).width == 2_000
    assert reason(small, ValidationConfig(max_pixels=3_999_999)) == "decompression_bomb"
