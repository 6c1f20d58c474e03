"""Fixtures of the data-layer tests: a small generated scene set and fixture-file helpers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distiq.data.scenes import SceneConfig, generate_scenes


@pytest.fixture(scope="session")
def scene_set(tmp_path_factory):
    """60 scenes (48/6/6) at 64 px with COCO instance masks (RLE), generated once."""
    out = tmp_path_factory.mktemp("scenes")
    return generate_scenes(
        out, count=60, seed=3, config=SceneConfig(instance_masks=True), workers=1
    )


def write_image(path: Path, size: tuple[int, int] = (16, 12), seed: int = 0) -> np.ndarray:
    """A random RGB image of ``size`` = (W, H); returns its (H, W, 3) array."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(array).save(path)
    return array


def write_mask(path: Path, mask: np.ndarray, bits: int = 8) -> None:
    """Save an integer mask as an 8-bit PNG, or 16-bit when ``bits=16`` or values exceed 255."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mask.ndim == 3 or (mask.max() <= 255 and bits == 8):
        Image.fromarray(mask.astype(np.uint8)).save(path)
    else:
        Image.fromarray(mask.astype(np.uint16)).save(path)


def corrupt(path: Path, how: str = "garbage") -> None:
    """Make ``path`` undecodable: random bytes, or the first half of its valid bytes."""
    if how == "garbage":
        path.write_bytes(b"this is not an image at all" * 4)
    else:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


@pytest.fixture
def files():
    """The fixture-file helpers above, as a namespace (test modules cannot import conftest)."""
    from types import SimpleNamespace

    return SimpleNamespace(write_image=write_image, write_mask=write_mask, corrupt=corrupt)
