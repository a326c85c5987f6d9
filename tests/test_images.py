import numpy as np
import pytest
import torch
from PIL import Image

from vistune.data.images import ImageConfig, ImageError, blank_image, fit_square, open_image, preprocess, to_rgb


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "I;16", "I", "F", "CMYK", "1"])
def test_any_mode_to_rgb(tmp_path, mode):
    arr = (np.arange(20 * 10) % 256).reshape(10, 20)
    if mode in ("I;16", "I", "F"):
        img = Image.fromarray((arr * 200).astype(np.uint16 if mode == "I;16" else np.int32)).convert(mode) \
            if mode != "I;16" else Image.fromarray((arr * 200).astype(np.uint16))
    else:
        img = Image.fromarray(arr.astype(np.uint8)).convert(mode)
    path = tmp_path / ("x.tiff" if mode in ("I;16", "I", "F", "CMYK") else "x.png")
    img.save(path)
    out = open_image(path)
    assert out.mode == "RGB" and out.size == (20, 10)


def test_rgba_composited_on_white():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(img).getpixel((0, 0)) == (255, 255, 255)


def test_pad_to_square_with_mean_colour():
    cfg = ImageConfig(size=8, aspect="pad")
    img = Image.new("RGB", (8, 4), (0, 0, 0))
    sq = fit_square(img, cfg)
    assert sq.size == (8, 8)
    assert sq.getpixel((4, 0)) == cfg.pad_color == (122, 116, 104)
    assert sq.getpixel((4, 4)) == (0, 0, 0)


def test_crop_and_resize():
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 5, 10))
    assert fit_square(img, ImageConfig(size=10, aspect="crop")).getpixel((0, 5)) == (0, 0, 0)
    assert fit_square(img, ImageConfig(size=10, aspect="resize")).getpixel((0, 5)) == (255, 255, 255)


def test_normalisation():
    cfg = ImageConfig(size=4, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    t = preprocess(Image.new("RGB", (4, 4), (255, 0, 255)), cfg)
    assert t.shape == (3, 4, 4)
    torch.testing.assert_close(t[:, 0, 0], torch.tensor([1.0, -1.0, 1.0]))
    assert preprocess(blank_image(ImageConfig(size=4)), ImageConfig(size=4)).abs().max() < 0.01


def test_missing_corrupt_and_bomb(tmp_path):
    with pytest.raises(ImageError, match="image not found: .*nope.png"):
        open_image(tmp_path / "nope.png")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(ImageError, match="cannot decode image .*bad.jpg") as e:
        open_image(bad)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"garbage")
    with pytest.raises(ImageError, match="cannot decode image .*junk.png: cannot identify image file") as e:
        open_image(junk)
    assert "BufferedReader" not in str(e.value)  # the path once, not PIL's reader repr too
    big = tmp_path / "big.png"
    Image.new("L", (2000, 2000)).save(big)
    with pytest.raises(ImageError, match="over the limit"):
        open_image(big, max_pixels=1_000_000)
    trunc = tmp_path / "trunc.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(trunc)
    trunc.write_bytes(trunc.read_bytes()[:60])
    with pytest.raises(ImageError, match="trunc.png"):
        open_image(trunc)


def test_a_huge_image_is_refused_without_pils_warning(tmp_path, monkeypatch):
    import warnings

    # PIL warns past MAX_IMAGE_PIXELS (89 M by default); lowered here so that a small image is "huge"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3_000_000)
    huge = tmp_path / "huge.png"
    Image.new("L", (2000, 2000)).save(huge)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(ImageError, match="huge.png has 2000x2000 pixels, over the limit"):
            open_image(huge, max_pixels=1_000_000)
    assert [str(w.message) for w in seen] == []


def test_bad_config():
    with pytest.raises(ValueError, match="aspect"):
        ImageConfig(aspect="stretch")
