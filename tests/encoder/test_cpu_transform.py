"""The CPU path's tensor transform gives open_clip's preprocess output, to Pillow's rounding."""

from __future__ import annotations

import io

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from encoder_service.preprocess.cpu_transform import RgbTensorTransform, cpu_transform
from tests import images

PREPROCESS = open_clip.image_transform(224, is_train=False)
STD = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)


def pixel_levels(difference: torch.Tensor) -> torch.Tensor:
    """A difference of normalized values as a difference of 0..255 pixel levels."""
    return difference.abs() * STD * 255


def noise(width: int, height: int) -> Image.Image:
    pixels = np.random.default_rng(width * height).integers(0, 256, (height, width, 3))
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


@pytest.mark.parametrize(
    "image",
    [
        images.picture(640, 480, seed=1),
        Image.open(io.BytesIO(images.jpeg(3000, 2000, seed=2))).convert("RGB"),
        images.picture(150, 1600, seed=3),
        images.picture(2000, 150, seed=4),
        images.picture(224, 224, seed=5),
        images.picture(225, 300, seed=6),
        images.picture(1, 1, seed=7),
        images.picture(3, 2, seed=8),
        noise(640, 480),
        noise(97, 1203),
    ],
    ids=lambda image: f"{image.width}x{image.height}",
)
def test_rgb_images_match_open_clips_transform_to_two_pixel_levels(image: Image.Image) -> None:
    fast = cpu_transform(PREPROCESS)
    assert isinstance(fast, RgbTensorTransform)
    expected, got = PREPROCESS(image), fast(image)
    assert got.shape == expected.shape == (3, 224, 224)
    assert got.dtype == expected.dtype == torch.float32 and got.is_contiguous()
    levels = pixel_levels(got - expected)
    assert levels.max() <= 2.01  # Pillow and torch round a few resized pixels differently
    assert levels.mean() < 0.02


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "I;16", "1"])
def test_other_modes_take_open_clips_own_transform_exactly(mode: str) -> None:
    picture = images.picture(320, 240, seed=9)
    image = picture.convert("I;16") if mode == "I;16" else picture.convert(mode)
    assert image.mode == mode
    assert torch.equal(cpu_transform(PREPROCESS)(image), PREPROCESS(image))


def test_an_unusual_preprocess_is_used_as_it_is() -> None:
    from torchvision import transforms

    squash = transforms.Compose([transforms.Resize((224, 224)), transforms.ToTensor()])
    assert cpu_transform(squash) is squash
