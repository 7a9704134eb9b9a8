"""Decoding and crops checked against hand-built images and PIL references; DataConfig validation."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from vitvq.data.config import DataConfig
from vitvq.data.stream import Decode
from vitvq.data.transforms import random_resized_box, to_float
from vitvq.configs import ConfigError, from_dict

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def bands(w: int, h: int, edges: tuple[int, int]) -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : edges[0]] = RED
    a[:, edges[0]: edges[1]] = GREEN
    a[:, edges[1]:] = BLUE
    return Image.fromarray(a)


def encode(im: Image.Image, fmt: str) -> dict:
    buf = io.BytesIO()
    im.save(buf, format=fmt, quality=95)
    return {"__key__": "k", "jpg" if fmt == "JPEG" else "png": buf.getvalue(), "cls": b"3"}


def test_center_crop_takes_the_middle_square() -> None:
    x, label, key = Decode(40, train=False)(encode(bands(80, 40, (20, 60)), "PNG"), None)
    assert label == 3 and key == "k" and x.dtype == torch.uint8 and x.shape == (3, 40, 40)
    assert torch.equal(x, torch.tensor(GREEN, dtype=torch.uint8).view(3, 1, 1).expand(3, 40, 40))


def test_draft_decoding_matches_a_full_decode_reference() -> None:
    # 1024x512 JPEG to 64 px: the centered 512 square is downscaled 8x, so libjpeg decodes at 1/8 scale.
    rng = np.random.default_rng(0)
    smooth = Image.fromarray(rng.integers(0, 256, (9, 17, 3), dtype=np.uint8)).resize((1024, 512), Image.BICUBIC)
    sample = encode(smooth, "JPEG")
    x, _, _ = Decode(64, train=False)(sample, None)
    ref = Image.open(io.BytesIO(sample["jpg"])).convert("RGB").crop((256, 0, 768, 512)).resize((64, 64), Image.BICUBIC)
    ref_t = torch.from_numpy(np.array(ref)).permute(2, 0, 1)
    assert (x.float() - ref_t.float()).abs().mean() < 2.5


def test_resize_crop_is_a_window_of_the_image_possibly_flipped() -> None:
    a = np.random.default_rng(1).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    sample = encode(Image.fromarray(a), "PNG")
    windows = [torch.from_numpy(a[:, i: i + 32]).permute(2, 0, 1) for i in range(17)]
    decode = Decode(32, train=True, transform="resize_crop", flip=True)
    offsets, flips = set(), set()
    for seed in range(40):
        x, _, _ = decode(sample, np.random.default_rng(seed))
        hits = [(i, f) for i, w in enumerate(windows) for f in (0, 1) if torch.equal(x, w.flip(-1) if f else w)]
        assert len(hits) == 1
        offsets.add(hits[0][0])
        flips.add(hits[0][1])
    assert flips == {0, 1} and len(offsets) > 8


def test_random_resized_box_respects_scale_and_ratio() -> None:
    rng = np.random.default_rng(2)
    for _ in range(500):
        x, y, w, h = random_resized_box(400, 300, rng, (0.3, 0.9))
        assert 0 <= x and x + w <= 400 and 0 <= y and y + h <= 300
        if (w, h) != (300, 300):  # the fallback after ten failed tries is the centered square
            assert 0.3 * 0.97 <= w * h / 120000 <= 0.9 * 1.03
            assert math.log(3 / 4) - 0.02 <= math.log(w / h) <= math.log(4 / 3) + 0.02


def test_pixel_ranges() -> None:
    u = torch.tensor([0, 127, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    assert torch.allclose(to_float(u, "minus_one_one").flatten(), torch.tensor([-1.0, 127 / 127.5 - 1, 1.0]))
    assert torch.allclose(to_float(u, "zero_one").flatten(), torch.tensor([0.0, 127 / 255, 1.0]))


def test_data_config_validation() -> None:
    cfg = from_dict(DataConfig, {"train_shards": "x.json", "pixel_range": "zero_one", "crop_scale": [0.3, 1.0]})
    assert cfg.crop_scale == (0.3, 1.0) and cfg.streams == 4
    assert from_dict(DataConfig, {"source": "demo", "num_workers": 0}).streams == 1
    with pytest.raises(ConfigError, match="train_shards"):
        from_dict(DataConfig, {})
    with pytest.raises(ConfigError, match="pixel_range"):
        from_dict(DataConfig, {"train_shards": "x", "pixel_range": "-1,1"})
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(DataConfig, {"train_shards": "x", "shuffle": 10})
    with pytest.raises(ConfigError, match="crop_scale"):
        DataConfig(train_shards="x", crop_scale=(0.9, 0.2))
