import pytest
from PIL import Image

from vlm_rl.tools import crop_region


def test_crop_region_cuts_the_original_pixels_and_fits_the_budget():
    image = Image.new("RGB", (400, 300), "white")
    image.paste((255, 0, 0), (100, 100, 110, 110))  # a 10x10 red patch
    crop, shrunk = crop_region(image, (95, 95, 115, 115), max_pixels=10_000)
    assert not shrunk and crop.size == (20, 20)
    assert crop.getpixel((10, 10)) == (255, 0, 0) and crop.getpixel((1, 1)) == (255, 255, 255)

    crop, shrunk = crop_region(image, (0, 0, 400, 300), max_pixels=1200)
    assert shrunk and crop.width * crop.height <= 1200 and crop.size == (40, 30)  # the aspect kept


def test_crop_region_clamps_to_the_image_and_refuses_an_empty_box():
    image = Image.new("RGB", (64, 48))
    crop, _ = crop_region(image, (50, 40, 90, 90), max_pixels=10_000)
    assert crop.size == (14, 8)
    with pytest.raises(ValueError, match=r"no area inside the 64x48 image"):
        crop_region(image, (70, 10, 90, 20), max_pixels=10_000)
