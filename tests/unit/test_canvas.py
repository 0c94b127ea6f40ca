"""The image geometry of img2img, inpainting and outpainting (impasto.backends.canvas)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from impasto.backends.canvas import (
    blend_back,
    crop_for_inpaint,
    fit_image,
    fit_mask,
    is_blank,
    mask_to_l,
    masked_region,
    outpaint_canvas,
    paste_back,
    round_to_multiple,
    working_size,
)

BOUNDED = settings(max_examples=40, deadline=None)


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int64)


def rect_mask(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[box[1] : box[3], box[0] : box[2]] = 255
    return Image.fromarray(mask)


# --- round_to_multiple ---------------------------------------------------------------------


def test_round_to_multiple_rounds_to_nearest_and_never_below_the_multiple() -> None:
    assert round_to_multiple(1023.9) == 1024
    assert round_to_multiple(1019) == 1016
    assert round_to_multiple(1020) == 1024
    assert round_to_multiple(3) == 8
    assert round_to_multiple(100, 64) == 128
    with pytest.raises(ValueError, match="multiple"):
        round_to_multiple(10, 0)


# --- fit_image / fit_mask --------------------------------------------------------------------


def test_fit_image_covers_then_crops_the_center_of_a_wide_image() -> None:
    ramp = np.tile(np.arange(200, dtype=np.uint8)[np.newaxis, :, np.newaxis], (100, 1, 3))
    fitted = fit_image(Image.fromarray(ramp), 100, 100)
    assert fitted.size == (100, 100)
    assert fitted.mode == "RGB"
    row = pixels(fitted)[50, :, 0]
    # Scale 1, so the crop is columns 50..149 of the source.
    assert abs(row[0] - 50) <= 1
    assert abs(row[-1] - 149) <= 1


def test_fit_image_covers_then_crops_the_center_of_a_tall_image() -> None:
    ramp = np.tile(np.arange(0, 240, 2, dtype=np.uint8)[:, np.newaxis, np.newaxis], (1, 30, 3))
    fitted = fit_image(Image.fromarray(ramp), 60, 60)  # 30x120 -> scale 2 -> 60x240 -> rows 90..
    assert fitted.size == (60, 60)
    column = pixels(fitted)[:, 30, 0]
    # Output row r samples source row (r + 90.5) / 2 - 0.5, whose value is twice that.
    assert abs(column[0] - 90) <= 2
    assert abs(column[-1] - 148) <= 2


def test_fit_image_upscales_a_small_image_to_cover() -> None:
    fitted = fit_image(noise(30, 20), 64, 32)
    assert fitted.size == (64, 32)


def test_fit_image_of_the_right_size_is_an_rgb_copy() -> None:
    source = noise(32, 24)
    fitted = fit_image(source, 32, 24)
    assert fitted is not source
    assert np.array_equal(pixels(fitted), pixels(source))
    rgba = source.convert("RGBA")
    assert fit_image(rgba, 32, 24).mode == "RGB"


def test_fit_image_rejects_an_empty_size() -> None:
    with pytest.raises(ValueError, match="positive"):
        fit_image(noise(10, 10), 0, 10)


def test_fit_mask_stays_aligned_with_fit_image() -> None:
    source = np.zeros((90, 160), dtype=np.uint8)
    source[30:60, 100:130] = 255
    image = Image.fromarray(np.stack([source] * 3, axis=-1))
    mask = Image.fromarray(source)
    fitted_image = pixels(fit_image(image, 64, 64))[..., 0]
    fitted_mask = pixels(fit_mask(mask, 64, 64))
    assert fit_mask(mask, 64, 64).mode == "L"
    assert fitted_mask.shape == (64, 64)

    def centroid(a: np.ndarray) -> np.ndarray:
        ys, xs = np.nonzero(a > 127)
        return np.array([ys.mean(), xs.mean()])

    assert np.abs(centroid(fitted_image) - centroid(fitted_mask)).max() < 0.5
    # Hard inside and out; grey only along the edge.
    assert fitted_mask[32, 48] == 255
    assert fitted_mask[5, 5] == 0


def test_fit_mask_of_the_right_size_converts_only() -> None:
    mask = rect_mask(16, 16, (2, 2, 8, 8)).convert("1")
    fitted = fit_mask(mask, 16, 16)
    assert fitted.mode == "L"
    assert np.array_equal(pixels(fitted), pixels(rect_mask(16, 16, (2, 2, 8, 8))))


@BOUNDED
@given(st.integers(1, 80), st.integers(1, 80), st.integers(1, 80), st.integers(1, 80))
def test_fit_image_and_mask_always_have_the_requested_size(
    src_w: int, src_h: int, width: int, height: int
) -> None:
    assert fit_image(noise(src_w, src_h), width, height).size == (width, height)
    mask = rect_mask(src_w, src_h, (0, 0, src_w, src_h))
    fitted = fit_mask(mask, width, height)
    assert fitted.size == (width, height)
    assert pixels(fitted).min() == 255  # an all-white mask stays all white


# --- mask_to_l / is_blank --------------------------------------------------------------------


def test_mask_to_l_keeps_an_l_mask_as_is() -> None:
    mask = Image.fromarray(np.array([[0, 128, 255]], dtype=np.uint8))
    converted = mask_to_l(mask)
    assert converted is not mask
    assert pixels(converted).tolist() == [[0, 128, 255]]


def test_mask_to_l_reads_a_1_bit_mask_as_black_and_white() -> None:
    mask = Image.new("1", (3, 1))
    mask.putpixel((1, 0), 1)
    assert pixels(mask_to_l(mask)).tolist() == [[0, 255, 0]]


def test_mask_to_l_reads_an_rgb_mask_by_luminance() -> None:
    rgb = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0]]], dtype=np.uint8)
    converted = mask_to_l(Image.fromarray(rgb))
    assert converted.mode == "L"
    assert pixels(converted).tolist() == [[0, 255, 76]]  # ITU-R 601: 0.299 * 255


def test_mask_to_l_reads_an_opaque_rgba_mask_by_luminance() -> None:
    rgba = np.array([[[0, 0, 0, 255], [255, 255, 255, 255]]], dtype=np.uint8)
    assert pixels(mask_to_l(Image.fromarray(rgba))).tolist() == [[0, 255]]


def test_mask_to_l_reads_transparent_pixels_as_keep_whatever_their_colour() -> None:
    # A white stroke on a transparent layer, with white or black stored under alpha 0.
    rgba = np.array(
        [[[255, 255, 255, 255], [255, 255, 255, 0], [0, 0, 0, 0], [255, 255, 255, 128]]],
        dtype=np.uint8,
    )
    assert pixels(mask_to_l(Image.fromarray(rgba))).tolist() == [[255, 0, 0, 128]]


def test_mask_to_l_reads_la_masks_through_their_alpha() -> None:
    la = Image.fromarray(np.array([[[255, 255], [255, 0], [100, 255]]], dtype=np.uint8), "LA")
    assert pixels(mask_to_l(la)).tolist() == [[255, 0, 100]]


def test_mask_to_l_reads_a_palette_mask_by_colour() -> None:
    palette = Image.fromarray(np.array([[0, 255, 0]], dtype=np.uint8)).convert("P")
    assert palette.mode == "P"
    assert pixels(mask_to_l(palette)).tolist() == [[0, 255, 0]]


def test_mask_to_l_reads_a_transparent_palette_entry_as_keep() -> None:
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 255, 255, 255, 255, 255])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    assert pixels(mask_to_l(palette)).tolist() == [[0, 255]]


def test_is_blank_only_for_an_all_black_mask() -> None:
    assert is_blank(Image.new("L", (8, 8)))
    assert is_blank(Image.new("RGB", (8, 8)))
    assert is_blank(Image.new("RGBA", (8, 8), (255, 255, 255, 0)))
    one = Image.new("L", (8, 8))
    one.putpixel((7, 7), 1)
    assert not is_blank(one)
    assert not is_blank(Image.new("1", (8, 8), 1))


# --- blend_back ------------------------------------------------------------------------------


def test_blend_back_is_bit_exact_outside_and_inside_the_mask() -> None:
    original, generated = noise(24, 16, seed=1), noise(24, 16, seed=2)
    mask = rect_mask(24, 16, (4, 3, 15, 11))
    blended = pixels(blend_back(generated, original, mask))
    inside = pixels(mask) == 255
    assert np.array_equal(blended[~inside], pixels(original)[~inside])
    assert np.array_equal(blended[inside], pixels(generated)[inside])


def test_blend_back_is_linear_in_between() -> None:
    original = Image.new("RGB", (3, 1), (0, 0, 0))
    generated = Image.new("RGB", (3, 1), (255, 100, 10))
    mask = Image.fromarray(np.array([[0, 128, 255]], dtype=np.uint8))
    blended = pixels(blend_back(generated, original, mask))
    assert blended[0].tolist() == [[0, 0, 0], [128, 50, 5], [255, 100, 10]]


def test_blend_back_rejects_mismatched_sizes() -> None:
    with pytest.raises(ValueError, match="one size"):
        blend_back(noise(8, 8), noise(8, 8), Image.new("L", (8, 9)))
    with pytest.raises(ValueError, match="one size"):
        blend_back(noise(9, 8), noise(8, 8), Image.new("L", (8, 8)))


@BOUNDED
@given(st.integers(0, 2**32 - 1), st.integers(1, 24), st.integers(1, 24))
def test_blend_back_keeps_every_original_pixel_under_a_zero_mask(
    seed: int, width: int, height: int
) -> None:
    rng = np.random.default_rng(seed)
    mask_values = rng.choice([0, 0, 255, 1, 254, 77], size=(height, width)).astype(np.uint8)
    original, generated = noise(width, height, seed), noise(width, height, seed + 1)
    blended = pixels(blend_back(generated, original, Image.fromarray(mask_values)))
    assert np.array_equal(blended[mask_values == 0], pixels(original)[mask_values == 0])
    assert np.array_equal(blended[mask_values == 255], pixels(generated)[mask_values == 255])
    low = np.minimum(pixels(original), pixels(generated))
    high = np.maximum(pixels(original), pixels(generated))
    assert ((blended >= low) & (blended <= high)).all()


# --- masked_region ---------------------------------------------------------------------------


def test_masked_region_of_a_blank_mask_is_none() -> None:
    assert masked_region(Image.new("L", (64, 64)), 16) is None


def test_masked_region_grows_the_bounding_box_by_the_margin() -> None:
    mask = rect_mask(128, 128, (40, 50, 56, 66))  # 16 x 16
    assert masked_region(mask, 0) == (40, 50, 56, 66)
    assert masked_region(mask, 8) == (32, 42, 64, 74)


def test_masked_region_clamps_to_the_image() -> None:
    mask = rect_mask(64, 48, (2, 40, 10, 48))
    assert masked_region(mask, 16) == (0, 24, 32, 48)


def test_masked_region_grows_sides_to_multiples_about_the_center() -> None:
    mask = rect_mask(128, 128, (50, 60, 61, 63))  # 11 x 3
    left, top, right, bottom = masked_region(mask, 2) or (0, 0, 0, 0)  # 15 x 7 before
    assert (right - left, bottom - top) == (16, 8)
    assert (left, top, right, bottom) == (48, 58, 64, 66)


def test_masked_region_shifts_an_aligned_box_back_inside_the_image() -> None:
    mask = rect_mask(100, 100, (95, 0, 100, 3))
    assert masked_region(mask, 0) == (92, 0, 100, 8)


def test_masked_region_takes_the_whole_side_when_no_multiple_fits() -> None:
    mask = rect_mask(100, 30, (1, 1, 99, 29))  # 98 needs 104 > 100; 28 -> 32 > 30
    assert masked_region(mask, 0) == (0, 0, 100, 30)


def test_masked_region_rejects_a_negative_margin() -> None:
    with pytest.raises(ValueError, match="margin"):
        masked_region(rect_mask(8, 8, (1, 1, 2, 2)), -1)


@BOUNDED
@given(
    st.integers(8, 96),
    st.integers(8, 96),
    st.data(),
    st.integers(0, 40),
    st.sampled_from([1, 8, 64]),
)
def test_masked_region_contains_the_mask_and_stays_inside(
    width: int, height: int, data: st.DataObject, margin: int, multiple: int
) -> None:
    x0 = data.draw(st.integers(0, width - 1))
    y0 = data.draw(st.integers(0, height - 1))
    x1 = data.draw(st.integers(x0 + 1, width))
    y1 = data.draw(st.integers(y0 + 1, height))
    box = masked_region(rect_mask(width, height, (x0, y0, x1, y1)), margin, multiple)
    assert box is not None
    left, top, right, bottom = box
    assert 0 <= left <= max(0, x0 - margin)
    assert 0 <= top <= max(0, y0 - margin)
    assert min(width, x1 + margin) <= right <= width
    assert min(height, y1 + margin) <= bottom <= height
    assert (right - left) % multiple == 0 or (left, right) == (0, width)
    assert (bottom - top) % multiple == 0 or (top, bottom) == (0, height)


# --- working_size / crop_for_inpaint / paste_back --------------------------------------------


def test_working_size_keeps_the_crop_aspect_within_the_model_size() -> None:
    assert working_size((0, 0, 128, 64), 1024, 1024) == (1024, 512)
    assert working_size((10, 10, 74, 202), 512, 512) == (168, 512)
    assert working_size((0, 0, 100, 100), 1024, 768) == (768, 768)
    assert working_size((0, 0, 3, 300), 512, 512) == (8, 512)


def test_crop_for_inpaint_scales_the_crop_to_the_working_size() -> None:
    image, mask = noise(200, 150), rect_mask(200, 150, (60, 40, 90, 70))
    box = masked_region(mask, 16)
    assert box is not None
    crop, crop_mask = crop_for_inpaint(image, mask, box, 512, 512)
    assert crop.size == crop_mask.size == working_size(box, 512, 512)
    assert crop.mode == "RGB"
    assert crop_mask.mode == "L"
    center = crop_mask.getpixel((crop.size[0] // 2, crop.size[1] // 2))
    corner = crop_mask.getpixel((0, 0))
    assert (center, corner) == (255, 0)


def test_crop_for_inpaint_rejects_a_box_outside_the_image() -> None:
    image, mask = noise(32, 32), rect_mask(32, 32, (1, 1, 4, 4))
    with pytest.raises(ValueError, match="outside"):
        crop_for_inpaint(image, mask, (0, 0, 40, 8), 64, 64)
    with pytest.raises(ValueError, match="differs"):
        crop_for_inpaint(image, Image.new("L", (31, 32)), (0, 0, 8, 8), 64, 64)


def test_crop_and_paste_back_keeps_every_pixel_outside_the_mask() -> None:
    original = noise(160, 120, seed=3)
    mask = rect_mask(160, 120, (70, 30, 100, 55))
    box = masked_region(mask, 12)
    assert box is not None
    crop, _ = crop_for_inpaint(original, mask, box, 512, 512)
    generated_crop = noise(*crop.size, seed=4)  # what the pipeline would return
    final = paste_back(original, generated_crop, mask, box)
    assert final.size == original.size
    keep = pixels(mask) == 0
    assert np.array_equal(pixels(final)[keep], pixels(original)[keep])
    assert not np.array_equal(pixels(final)[~keep], pixels(original)[~keep])


def test_paste_back_puts_the_scaled_crop_inside_the_mask() -> None:
    original = Image.new("RGB", (64, 64), (0, 0, 0))
    mask = rect_mask(64, 64, (16, 16, 48, 48))
    generated_crop = Image.new("RGB", (256, 256), (200, 10, 30))
    final = pixels(paste_back(original, generated_crop, mask, (8, 8, 56, 56)))
    assert final[32, 32].tolist() == [200, 10, 30]
    assert final[10, 10].tolist() == [0, 0, 0]


def test_paste_back_rejects_a_mask_of_another_size() -> None:
    with pytest.raises(ValueError, match="differs"):
        paste_back(noise(16, 16), noise(8, 8), Image.new("L", (8, 8)), (0, 0, 8, 8))


# --- outpaint_canvas -------------------------------------------------------------------------


def test_outpaint_canvas_sizes_and_places_the_original_exactly() -> None:
    seed = noise(40, 30)
    canvas, mask = outpaint_canvas(seed, top=8, right=16, bottom=0, left=24, blur=0)
    assert canvas.size == mask.size == (40 + 24 + 16, 30 + 8)
    assert (canvas.mode, mask.mode) == ("RGB", "L")
    assert np.array_equal(pixels(canvas)[8:38, 24:64], pixels(seed))


def test_outpaint_canvas_stretches_the_edge_pixels_outward() -> None:
    seed = noise(10, 6)
    canvas = pixels(outpaint_canvas(seed, top=3, right=2, bottom=4, left=5, blur=0)[0])
    source = pixels(seed)
    assert np.array_equal(canvas[0, 5:15], source[0])  # above: the top row
    assert np.array_equal(canvas[12, 5:15], source[-1])  # below: the bottom row
    assert np.array_equal(canvas[3:9, 0], source[:, 0])  # left: the left column
    assert np.array_equal(canvas[3:9, 16], source[:, -1])  # right: the right column
    assert canvas[0, 0].tolist() == source[0, 0].tolist()  # corner: the corner pixel


def test_outpaint_mask_is_white_on_the_new_area_and_black_on_the_original() -> None:
    canvas, mask = outpaint_canvas(noise(20, 10), top=4, right=0, bottom=2, left=6, blur=0)
    values = pixels(mask)
    assert (values[4:14, 6:26] == 0).all()
    new_area = np.ones_like(values, dtype=bool)
    new_area[4:14, 6:26] = False
    assert (values[new_area] == 255).all()
    assert canvas.size == (26, 16)


def test_outpaint_without_blur_keeps_every_original_pixel_after_blending() -> None:
    seed = noise(32, 24, seed=5)
    canvas, mask = outpaint_canvas(seed, top=8, right=8, bottom=8, left=8, blur=0)
    generated = noise(*canvas.size, seed=6)
    final = pixels(blend_back(generated, canvas, mask))
    assert np.array_equal(final[8:32, 8:40], pixels(seed))


def test_outpaint_blur_feathers_only_blur_pixels_into_the_original() -> None:
    blur = 4
    _, mask = outpaint_canvas(noise(30, 20), top=0, right=0, bottom=0, left=8, blur=blur)
    values = pixels(mask)
    assert (values[:, :8] == 255).all()
    row = values[10, 8:]
    assert row[:blur].tolist() == sorted(row[:blur].tolist(), reverse=True)
    assert (row[:blur] > 0).all()
    assert (row[:blur] < 255).all()
    assert (row[blur:] == 0).all()
    # Sides that were not extended are no seam: no feather along them.
    assert (values[0, 8 + blur :] == 0).all()
    assert (values[-1, 8 + blur :] == 0).all()


def test_outpaint_blur_feathers_from_each_extended_side() -> None:
    blur = 3
    _, mask = outpaint_canvas(noise(20, 20), top=5, right=5, bottom=5, left=5, blur=blur)
    original = pixels(mask)[5:25, 5:25]
    ring = np.zeros_like(original, dtype=bool)
    ring[:blur, :] = ring[-blur:, :] = ring[:, :blur] = ring[:, -blur:] = True
    assert (original[ring] > 0).all()
    assert (original[~ring] == 0).all()


def test_outpaint_with_no_sides_is_the_image_and_a_blank_mask() -> None:
    seed = noise(12, 9)
    canvas, mask = outpaint_canvas(seed, 0, 0, 0, 0, blur=8)
    assert np.array_equal(pixels(canvas), pixels(seed))
    assert is_blank(mask)


def test_outpaint_rejects_negative_sides_and_blur() -> None:
    with pytest.raises(ValueError, match="left"):
        outpaint_canvas(noise(8, 8), 0, 0, 0, -8)
    with pytest.raises(ValueError, match="blur"):
        outpaint_canvas(noise(8, 8), 8, 0, 0, 0, blur=-1)


@BOUNDED
@given(
    st.integers(1, 24),
    st.integers(1, 24),
    st.tuples(*[st.integers(0, 12)] * 4),
    st.integers(0, 32),
)
def test_outpaint_feather_never_reaches_past_blur(
    width: int, height: int, sides: tuple[int, int, int, int], blur: int
) -> None:
    top, right, bottom, left = sides
    seed = noise(width, height)
    canvas, mask = outpaint_canvas(seed, top, right, bottom, left, blur)
    assert canvas.size == (width + left + right, height + top + bottom)
    assert np.array_equal(pixels(canvas)[top : top + height, left : left + width], pixels(seed))
    values = pixels(mask)
    inner = values[top : top + height, left : left + width]
    ys, xs = np.mgrid[0:height, 0:width]
    far = blur + 1
    distance = np.full((height, width), far)
    for extended, d in ((left, xs + 1), (right, width - xs), (top, ys + 1), (bottom, height - ys)):
        if extended:
            distance = np.minimum(distance, d)
    assert (inner[distance > blur] == 0).all()
    assert (inner[distance <= blur] > 0).all()
    outer = np.ones_like(values, dtype=bool)
    outer[top : top + height, left : left + width] = False
    assert (values[outer] == 255).all()
