"""What an inpainting or outpainting call works on, and how its result goes back: the seed
image fitted to the output size (or placed on the outpaint canvas), the mask, and with
`maskMargin` the crop around the masked area that is inpainted at the model's working size."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from impasto.backends import canvas
from impasto.backends.base import Outpaint


@dataclass
class InpaintCanvas:
    """The full-size source and mask, and the crop the pipeline works on, if any."""

    image: Image.Image  # the fitted seed image, or the outpaint canvas
    mask: Image.Image  # "L", white = repaint
    box: canvas.Box | None = None  # the maskMargin crop
    work_image: Image.Image | None = None
    work_mask: Image.Image | None = None

    def finish(self, generated: Image.Image) -> Image.Image:
        """The pipeline's output put back: equal to the source wherever the mask is 0."""
        if self.box is not None:
            return canvas.paste_back(self.image, generated, self.mask, self.box)
        if generated.size != self.image.size:
            generated = generated.resize(self.image.size, Image.Resampling.LANCZOS)
        return canvas.blend_back(generated, self.image, self.mask)


def plan_canvas(
    seed: Image.Image,
    mask: Image.Image | None,
    outpaint: Outpaint | None,
    margin: int | None,
    width: int,
    height: int,
    multiple: int,
) -> InpaintCanvas:
    """The canvas of one job at its output size `width` x `height`; `multiple` is the
    pipeline's latent grid, for the working size of a maskMargin crop."""
    if outpaint is not None:
        o = outpaint
        inner = canvas.fit_image(seed, width - o.left - o.right, height - o.top - o.bottom)
        image, extended = canvas.outpaint_canvas(inner, o.top, o.right, o.bottom, o.left, o.blur)
        return InpaintCanvas(image=image, mask=extended)
    image = canvas.fit_image(seed, width, height)
    if mask is None:
        # An inpainting checkpoint without a mask (refused at validation): repaint all.
        return InpaintCanvas(image=image, mask=Image.new("L", image.size, 255))
    fitted = canvas.fit_mask(canvas.mask_to_l(mask), width, height)
    result = InpaintCanvas(image=image, mask=fitted)
    if margin is not None:
        box = canvas.masked_region(fitted, margin)
        if box is not None:
            result.box = box
            result.work_image, result.work_mask = canvas.crop_for_inpaint(
                image, fitted, box, width, height, multiple
            )
    return result
