"""Low-level descriptors: colour histogram, LBP, HOG-like, GIST-like."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from featurestore.errors import InvalidInputError
from featurestore.features.lowlevel import LowLevelExtractor


@pytest.fixture(scope="module")
def ex() -> LowLevelExtractor:
    # Smaller than the default to keep the tests quick; same code paths.
    return LowLevelExtractor(working_size=(64, 64), gist_size=(64, 64))


def _stripes(size: int = 64, period: int = 8, vertical: bool = True) -> Image.Image:
    x = np.arange(size)
    wave = (127 + 120 * np.sin(2 * np.pi * x / period)).astype(np.uint8)
    plane = np.tile(wave, (size, 1)) if vertical else np.tile(wave[:, None], (1, size))
    return Image.fromarray(np.stack([plane, plane // 2, 255 - plane], axis=-1), "RGB")


def _noise(seed: int, size: tuple[int, int] = (80, 60)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def _vec(ex: LowLevelExtractor, img: Image.Image) -> np.ndarray:
    return ex.compute([ex.prepare(img)])[ex.name][0]


def test_outputs_and_params(ex):
    (spec,) = ex.outputs()
    assert (spec.name, spec.kind) == ("lowlevel", "lowlevel")
    assert spec.dim == ex.dim == 128 + 59 + 144 + 512
    p = spec.params
    assert p["working_size"] == [64, 64]
    assert p["blocks"] == {"hsv": [0, 128], "lbp": [128, 187], "hog": [187, 331], "gist": [331, 843]}
    assert p["hog"]["orientations"] == 9 and p["hog"]["grid"] == [4, 4]
    assert p["gist"]["orientations"] == 8 and len(p["gist"]["frequencies"]) == 4
    assert p["lbp"]["bins"] == 59
    json.dumps(p)


def test_default_dim_and_working_size():
    (spec,) = LowLevelExtractor().outputs()
    assert spec.dim == 843
    assert spec.params["working_size"] == [256, 256]
    assert spec.params["gist"]["size"] == [128, 128]


@pytest.mark.parametrize(
    "img",
    [
        _noise(0),
        _stripes(),
        Image.new("L", (33, 17), 90),  # grayscale, odd size, featureless
        Image.new("RGBA", (5, 301), (10, 200, 30, 128)),
        Image.new("RGB", (1, 1), (255, 255, 255)),
    ],
    ids=["noise", "stripes", "gray-odd-flat", "rgba-thin", "1x1"],
)
def test_dims_finite_and_normalised(ex, img):
    v = _vec(ex, img)
    assert v.shape == (ex.dim,) and v.dtype == np.float32
    assert np.isfinite(v).all()
    for block in ("hsv", "lbp"):
        a, b = ex.blocks[block]
        assert v[a:b].min() >= 0
        assert v[a:b].sum() == pytest.approx(1.0, abs=1e-5)
    a, b = ex.blocks["hog"]
    assert v[a:b].sum() == pytest.approx(1.0, abs=1e-5) or not v[a:b].any()
    a, b = ex.blocks["gist"]
    assert np.linalg.norm(v[a:b]) == pytest.approx(1.0, abs=1e-5) or not v[a:b].any()


def test_textured_images_fill_every_block(ex):
    v = _vec(ex, _noise(1))
    for a, b in ex.blocks.values():
        assert v[a:b].any()


def test_different_images_differ_duplicates_identical(ex):
    a, b = _noise(1), _noise(2)
    va, vb = _vec(ex, a), _vec(ex, b)
    assert not np.array_equal(va, vb)
    assert not np.allclose(va, _vec(ex, _stripes()))
    dup = a.copy()
    batch = ex.compute([ex.prepare(x) for x in (a, b, dup)])["lowlevel"]
    np.testing.assert_array_equal(batch[0], batch[2])
    np.testing.assert_array_equal(batch[0], va)  # batch-independent


def test_orientation_histogram_sees_rotation(ex):
    vertical = _vec(ex, _stripes(vertical=True))
    horizontal = _vec(ex, _stripes(vertical=False))
    rotated = _vec(ex, _stripes(vertical=True).transpose(Image.Transpose.ROTATE_90))
    a, b = ex.blocks["hog"]
    hv = vertical[a:b].reshape(16, 9).sum(axis=0)
    hh = horizontal[a:b].reshape(16, 9).sum(axis=0)
    # Vertical stripes: horizontal gradients (0 deg, bins 0/8); horizontal stripes: 90 deg (bin 4).
    assert np.argmax(hv) in (0, 8)
    assert np.argmax(hh) == 4
    hr = rotated[a:b].reshape(16, 9).sum(axis=0)
    assert np.argmax(hr) == 4  # rotating the vertical texture moves its energy to 90 deg
    np.testing.assert_allclose(hr, hh, atol=0.01)
    assert np.abs(hv - hh).sum() > 1.0
    g0, g1 = ex.blocks["gist"]
    assert not np.allclose(vertical[g0:g1], horizontal[g0:g1], atol=1e-3)


def test_colour_histogram_sees_colour_lbp_ignores_it(ex):
    red = Image.new("RGB", (40, 40), (220, 20, 20))
    blue = Image.new("RGB", (40, 40), (20, 20, 220))
    vr, vb = _vec(ex, red), _vec(ex, blue)
    a, b = ex.blocks["hsv"]
    assert not np.array_equal(vr[a:b], vb[a:b])
    a, b = ex.blocks["lbp"]
    np.testing.assert_array_equal(vr[a:b], vb[a:b])


def test_describe_checks_shape(ex):
    with pytest.raises(InvalidInputError, match="64x64x3"):
        ex.describe(np.zeros((10, 10, 3), dtype=np.uint8))


def test_bad_parameters():
    with pytest.raises(InvalidInputError):
        LowLevelExtractor(working_size=(4, 4))
    with pytest.raises(InvalidInputError):
        LowLevelExtractor(hsv_bins=(8, 4))
    with pytest.raises(InvalidInputError):
        LowLevelExtractor(gist_frequencies=(0.7,))
    with pytest.raises(InvalidInputError):
        LowLevelExtractor(rule="crop")


def test_empty_batch(ex):
    assert ex.compute([])["lowlevel"].shape == (0, ex.dim)


def test_prepare_is_thread_safe(ex):
    from concurrent.futures import ThreadPoolExecutor

    images = [_noise(i) for i in range(8)] + [_stripes()]
    serial = [ex.prepare(im) for im in images]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(ex.prepare, images * 3))
    for i, v in enumerate(threaded):
        np.testing.assert_array_equal(v, serial[i % len(images)])
