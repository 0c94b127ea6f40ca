"""Mask refinement and composition (backends/utility/matting.py) on a synthetic scene: a white
disc on a dark background, with the soft-edged mask a segmenter would give for it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from impasto.backends.utility.matting import (
    TRIMAP_BACKGROUND,
    TRIMAP_FOREGROUND,
    TRIMAP_UNKNOWN,
    alpha_matte,
    compose,
    guided_filter,
    post_process_mask,
    trimap,
)

WIDTH, HEIGHT = 48, 32
DISC = (10, 2, 38, 30)  # a 28 px disc centred at (24, 16)
CENTRE = (16, 24)  # (row, column)


def scene() -> Image.Image:
    image = Image.new("RGB", (WIDTH, HEIGHT), (20, 24, 32))
    ImageDraw.Draw(image).ellipse(DISC, fill=(250, 250, 250))
    return image


def hard_mask() -> Image.Image:
    mask = Image.new("L", (WIDTH, HEIGHT), 0)
    ImageDraw.Draw(mask).ellipse(DISC, fill=255)
    return mask


def soft_mask(radius: float = 2.0) -> Image.Image:
    return hard_mask().filter(ImageFilter.GaussianBlur(radius))


def values(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_trimap_marks_sure_foreground_sure_background_and_the_band_between() -> None:
    regions = trimap(soft_mask(), foreground_threshold=240, background_threshold=10, erode_size=3)
    assert set(np.unique(regions)) == {TRIMAP_BACKGROUND, TRIMAP_UNKNOWN, TRIMAP_FOREGROUND}
    assert regions[CENTRE] == TRIMAP_FOREGROUND
    assert regions[0, 0] == TRIMAP_BACKGROUND
    assert regions[-1, -1] == TRIMAP_BACKGROUND
    # The disc's edge (column 10 on the centre row) lies in the band.
    assert regions[CENTRE[0], 10] == TRIMAP_UNKNOWN
    # Walking out from the centre: foreground, then the band, then background, never back.
    row = regions[CENTRE[0], CENTRE[1] :].tolist()
    order = [TRIMAP_FOREGROUND, TRIMAP_UNKNOWN, TRIMAP_BACKGROUND]
    assert [v for i, v in enumerate(row) if i == 0 or row[i - 1] != v] == order


def test_trimap_band_widens_with_the_erode_size() -> None:
    narrow = trimap(soft_mask(), 240, 10, erode_size=1)
    wide = trimap(soft_mask(), 240, 10, erode_size=6)
    assert (wide == TRIMAP_UNKNOWN).sum() > (narrow == TRIMAP_UNKNOWN).sum()
    # Eroding only shrinks the sure regions.
    assert np.all((wide == TRIMAP_FOREGROUND) <= (narrow == TRIMAP_FOREGROUND))
    # The background touching the image's border is not eaten from there.
    assert wide[0, 0] == TRIMAP_BACKGROUND


def test_alpha_matte_keeps_the_known_regions_and_solves_the_band_between() -> None:
    mask = soft_mask()
    regions = trimap(mask, 240, 10, 3)
    alpha = values(alpha_matte(scene(), mask, 240, 10, 3))
    assert alpha.shape == (HEIGHT, WIDTH)
    known = regions != TRIMAP_UNKNOWN
    assert np.array_equal(alpha[known], regions[known])
    band = alpha[regions == TRIMAP_UNKNOWN]
    # Inside the band the alpha is not the flat trimap grey: it varies with the image.
    assert len(np.unique(band)) > 5


def test_alpha_matte_pulls_a_soft_edge_onto_the_image_edge() -> None:
    mask = soft_mask(2.0)
    band = trimap(mask, 240, 10, 4) == TRIMAP_UNKNOWN
    truth = values(hard_mask())
    before = np.abs(values(mask) - truth)[band].mean()
    after = np.abs(values(alpha_matte(scene(), mask, 240, 10, 4)) - truth)[band].mean()
    assert after < 0.7 * before


def test_alpha_matte_without_a_band_is_the_trimap() -> None:
    mask = hard_mask()
    alpha = values(alpha_matte(scene(), mask, 240, 10, erode_size=0))
    assert np.array_equal(alpha, values(mask))


def test_alpha_matte_rejects_a_mask_of_another_size() -> None:
    with pytest.raises(ValueError, match="differ in size"):
        alpha_matte(scene(), soft_mask().resize((24, 16)))


def test_guided_filter_keeps_a_constant_source_and_a_source_linear_in_the_guide() -> None:
    guide = np.asarray(scene(), dtype=np.float32) / 255
    constant = np.full((HEIGHT, WIDTH), 0.3, dtype=np.float32)
    assert np.allclose(guided_filter(guide, constant, 3, 1e-3), 0.3, atol=1e-4)
    # The guide's own luminance is (nearly) reproduced: the filter's local linear model.
    linear = guide.mean(axis=-1)
    assert np.abs(guided_filter(guide, linear, 3, 1e-4) - linear).max() < 0.005


def test_post_process_removes_an_isolated_speck_and_keeps_the_disc() -> None:
    mask = values(soft_mask()).astype(np.uint8)
    mask[2:4, 2:4] = 255  # a 2x2 speck far from the disc
    cleaned = values(post_process_mask(Image.fromarray(mask, mode="L")))
    assert set(np.unique(cleaned)) <= {0, 255}
    assert cleaned[2:4, 2:4].max() == 0
    assert cleaned[CENTRE] == 255
    # The disc keeps its size (its edge at the mask's 50 % line, smoothed).
    assert abs(int((cleaned == 255).sum()) - int((values(hard_mask()) > 127).sum())) < 40


def test_compose_without_a_colour_puts_the_alpha_on_the_image() -> None:
    image, alpha = scene(), soft_mask()
    cut = compose(image, alpha)
    assert cut.mode == "RGBA"
    assert cut.size == image.size
    assert np.array_equal(values(cut)[..., :3], values(image))
    assert np.array_equal(values(cut)[..., 3], values(alpha))


def test_compose_over_an_opaque_colour_is_opaque_and_shows_the_colour_outside() -> None:
    image, alpha = scene(), hard_mask()
    out = values(compose(image, alpha, (0, 200, 0, 255)))
    assert out.shape == (HEIGHT, WIDTH, 4)
    assert np.all(out[..., 3] == 255)
    assert out[0, 0].tolist() == [0, 200, 0, 255]
    assert out[CENTRE].tolist() == [250, 250, 250, 255]


def test_compose_over_a_translucent_colour_keeps_its_alpha_where_there_was_background() -> None:
    out = values(compose(scene(), hard_mask(), (255, 0, 0, 100)))
    assert out[0, 0].tolist() == [255, 0, 0, 100]
    assert out[CENTRE][3] == 255


def test_compose_rejects_a_colour_out_of_range() -> None:
    with pytest.raises(ValueError, match="0-255"):
        compose(scene(), hard_mask(), (0, 0, 300, 255))
