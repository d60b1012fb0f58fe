"""Parity with open_clip's own pipeline: the real ViT-B-32 architecture, every runtime here.

The reference is what open_clip documents: `preprocess(Image.open(file))` then
`model.encode_image`, in fp32, with the model built by open_clip itself from
the same seed. For EXIF-rotated files the reference is the upright copy: a
phone photo and its upright copy must get the same vector.
"""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from tests import images
from tests.conftest import start_encoder
from vpm.v1 import encoder_pb2, encoder_pb2_grpc

pytestmark = pytest.mark.slow

MIN_COSINE = 0.999


def corpus() -> dict[str, tuple[bytes, Image.Image | None]]:
    """Image files, each with the upright picture to use as reference (None: the file itself)."""
    pic = images.picture
    upright = pic(480, 320, seed=11)
    progressive = images.encode(pic(500, 375, seed=12), "JPEG", quality=85, progressive=True)
    rotated_jpeg = images.with_orientation(pic(400, 300, seed=13), 6, "JPEG")
    upright_of_jpeg = Image.open(io.BytesIO(rotated_jpeg)).transpose(Image.Transpose.ROTATE_270)
    return {
        "jpeg-640x480": (images.jpeg(640, 480, seed=1), None),
        "jpeg-large-3000x2000": (images.jpeg(3000, 2000, seed=2), None),
        "jpeg-progressive": (progressive, None),
        "png-rgb-1024x768": (images.encode(pic(1024, 768, seed=3), "PNG"), None),
        "png-alpha": (images.alpha_png(320, 240), None),
        "png-grayscale": (images.encode(pic(300, 300, seed=6).convert("L"), "PNG"), None),
        "jpeg-grayscale": (images.encode(pic(256, 320, seed=7).convert("L"), "JPEG"), None),
        "png-la": (images.encode(pic(200, 260, seed=8).convert("LA"), "PNG"), None),
        "png-palette": (images.encode(pic(240, 180, seed=9).convert("P"), "PNG"), None),
        "png-1bit": (images.encode(pic(200, 200, seed=10).convert("1"), "PNG"), None),
        # As a viewer shows it: its 16-bit levels scaled to 8 (Pillow's RGB would clip them).
        "png-16bit": (images.sixteen_bit_png(220, 160), images.sixteen_bit_png_as_viewed(220, 160)),
        "jpeg-cmyk": (images.cmyk_jpeg(300, 200), None),
        "gif-animated": (images.animated_gif(160, 120), None),
        "webp-lossy": (images.encode(pic(400, 300, seed=14), "WEBP", quality=80), None),
        "webp-lossless-alpha": (
            images.encode(pic(300, 300, seed=15).convert("RGBA"), "WEBP", lossless=True),
            None,
        ),
        "bmp": (images.encode(pic(250, 250, seed=16), "BMP"), None),
        "tiff": (images.encode(pic(260, 200, seed=17), "TIFF"), None),
        "tiny-1x1": (images.encode(pic(1, 1, seed=18), "PNG"), None),
        "tiny-3x2": (images.encode(pic(3, 2, seed=19), "PNG"), None),
        "panorama-2000x150": (images.jpeg(2000, 150, seed=20), None),
        "tall-150x1600": (images.jpeg(150, 1600, seed=21), None),
        "exif-6-png": (images.with_orientation(upright, 6, "PNG"), upright),
        "exif-8-png": (images.with_orientation(upright, 8, "PNG"), upright),
        "exif-3-png": (images.with_orientation(upright, 3, "PNG"), upright),
        "exif-2-png-mirrored": (images.with_orientation(upright, 2, "PNG"), upright),
        "exif-6-jpeg-phone-photo": (rotated_jpeg, upright_of_jpeg),
    }


@pytest.fixture(scope="module")
def reference():
    """open_clip's own model, transform and tokenizer for ViT-B-32 with seed-0 random weights."""
    import open_clip

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    return model.eval(), preprocess, open_clip.get_tokenizer("ViT-B-32")


def unit(rows: torch.Tensor) -> np.ndarray:
    rows = rows.float().numpy()
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_service_vectors_match_open_clip_reference(runtime: str, reference, tiny_settings) -> None:
    model, preprocess, tokenizer = reference
    files = corpus()
    assert len(files) >= 20
    with torch.inference_mode():
        pixels = torch.stack(
            [
                preprocess(picture if picture is not None else Image.open(io.BytesIO(data)))
                for data, picture in files.values()
            ]
        )
        expected_images = dict(zip(files, unit(model.encode_image(pixels)), strict=True))
        texts = [
            "a photo of a red dress",
            "white leather sneakers",
            "navy denim jacket " * 30,
            "ß ü 東京 🚀",
        ]
        expected_texts = unit(model.encode_text(tokenizer(texts)))

    thread, app = start_encoder(tiny_settings(model="ViT-B-32", runtime=runtime))
    try:
        assert app.engine.description.runtime == runtime
        stub = encoder_pb2_grpc.EncoderStub(grpc.insecure_channel(thread.target))
        requests = [encoder_pb2.ImageItem(id=key, data=data) for key, (data, _) in files.items()]
        replies = {reply.id: reply for reply in stub.EncodeImages(iter(requests), timeout=300)}
        cosines = {}
        for key, vector in expected_images.items():
            assert not replies[key].HasField("error"), (key, replies[key].error.message)
            cosines[key] = float(np.dot(np.array(replies[key].vector, dtype=np.float32), vector))
        worst = min(cosines, key=cosines.get)
        print(f"{runtime}: {len(cosines)} images, lowest cosine {cosines[worst]:.6f} ({worst})")
        assert cosines[worst] >= MIN_COSINE, (
            f"{runtime}: {worst} cosine {cosines[worst]:.6f}; all {cosines}"
        )

        items = stub.EncodeText(encoder_pb2.TextBatch(texts=texts), timeout=60).items
        text_cosines = [
            float(np.dot(np.array(item.vector, np.float32), ref))
            for item, ref in zip(items, expected_texts, strict=True)
        ]
        assert min(text_cosines) >= MIN_COSINE, text_cosines
    finally:
        thread.stop(0)
        app.engine.close(drain=False)


def test_the_tokenizer_gives_open_clips_tokens_for_any_text_and_forgets_old_words() -> None:
    """Ours encodes only the words that can reach the context and bounds its word cache;
    open_clip's own tokenizer is the oracle for the tokens."""
    import open_clip

    from encoder_service.model import Tokenizer

    texts = [
        "a photo of a red dress",
        "navy denim jacket " * 30,  # past the context: truncated the same way
        " ".join(f"w{i}" for i in range(76)),  # the 76 words that fill it exactly
        " ".join(f"w{i}" for i in range(77)),
        "ß ü 東京タワー 🚀 naïve café",
        "&amp;lt;b&amp;gt; bold &nbsp; tags",  # markup unescaped as open_clip unescapes it
        "tabs\tand\nnew   lines",
        "!!!??? ... 'quoted' it's don't",
        "x" * 100,
    ]
    ours = Tokenizer(open_clip.get_tokenizer("ViT-B-32"))
    assert torch.equal(ours(texts), open_clip.get_tokenizer("ViT-B-32")(texts))
    assert not ours.is_empty(ours(["a"])[0]) and ours.is_empty(ours(["\x00"])[0])

    inner = open_clip.get_tokenizer("ViT-B-32")
    small = Tokenizer(inner, cache_entries=100)
    words = [f"word{i}x" for i in range(1000)]
    assert torch.equal(small(words), open_clip.get_tokenizer("ViT-B-32")(words))
    assert len(inner.cache) <= 100  # open_clip's own would hold all 1,000
