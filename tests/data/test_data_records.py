"""Checked image reading: the pixel limit (an error, never PIL's warning), verify_images over a
split with damaged, foreign, missing and oversized files, and the advice bad-record errors give."""

from __future__ import annotations

import struct
import warnings
import zlib

import pytest
from PIL import Image

from distiq.data import records
from distiq.data.records import (
    CORRUPT_IMAGE,
    IMAGE_TOO_LARGE,
    MISSING_IMAGE,
    BadImagesError,
    BadRecordError,
    find_bad_images,
    image_problem,
    read_image,
    read_label_image,
    verify_images,
)


def write_blank_png(path, width, height):
    """A valid all-black 8-bit grey PNG of any size, compressed row by row (a 144-megapixel
    file is ~0.6 MB and never held in memory whole)."""

    def chunk(kind, data):
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    compressor = zlib.compressobj(1)
    row = bytes(width + 1)  # filter byte 0, then zeros
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("huge") / "huge.png"
    write_blank_png(path, 12_000, 12_000)  # 144 megapixels: PIL alone would only warn
    return path


def test_pil_alone_only_warns_about_the_144_megapixel_image(huge_png):
    # the reason for distiq's own limit
    with pytest.warns(Image.DecompressionBombWarning), Image.open(huge_png) as image:
        assert image.size == (12_000, 12_000)


def test_read_image_refuses_an_image_above_the_pixel_limit(huge_png):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no PIL warning escapes
        with pytest.raises(BadRecordError) as info:
            read_image(huge_png, "question 7")
    error = info.value
    assert error.reason == IMAGE_TOO_LARGE and error.file == str(huge_png)
    text = str(error)
    assert str(huge_png) in text and "question 7" in text
    assert "12000×12000 = 144_000_000 pixels" in text and "limit of 89_478_485" in text
    assert "distiq.data.records.MAX_IMAGE_PIXELS" in text and "max_pixels=" in text
    assert image_problem(huge_png)[0] == IMAGE_TOO_LARGE
    with pytest.raises(BadRecordError, match="image too large"):
        read_label_image(huge_png, "mask 7")


def test_the_pixel_limit_can_be_raised_or_lowered(huge_png, tmp_path, monkeypatch, files):
    small = tmp_path / "small.png"
    files.write_image(small, size=(16, 12))
    assert read_image(small, "x").size == (16, 12)
    with pytest.raises(BadRecordError, match="16×12 = 192 pixels, more than the limit of 100"):
        read_image(small, "x", max_pixels=100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # per call, or for the process through the module setting
        assert find_bad_images([huge_png], max_pixels=150_000_000) == ([], 1)
        monkeypatch.setattr(records, "MAX_IMAGE_PIXELS", 150_000_000)
        assert verify_images([huge_png], "big split") == 1
        monkeypatch.setattr(records, "MAX_IMAGE_PIXELS", None)  # no limit
        assert verify_images([huge_png], "big split") == 1


def test_verify_images_lists_every_bad_file_at_once(tmp_path, files):
    good = [tmp_path / f"good{i}.png" for i in range(3)]
    for i, path in enumerate(good):
        files.write_image(path, size=(32, 24), seed=i)
    truncated = tmp_path / "truncated.png"
    files.write_image(truncated, size=(32, 24), seed=9)
    files.corrupt(truncated, how="truncate")
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("a text file with a .png name\n")
    missing = tmp_path / "missing.png"
    paths = [*good, truncated, good[0], not_an_image, missing]

    assert verify_images(good + good, "train split") == 3  # repeats are checked once
    with pytest.raises(BadImagesError) as info:
        verify_images(paths, "train split of recipe.yaml")
    error = info.value
    assert [(p.path, p.reason) for p in error.problems] == [
        (str(truncated), CORRUPT_IMAGE),
        (str(not_an_image), CORRUPT_IMAGE),
        (str(missing), MISSING_IMAGE),
    ]
    text = str(error)
    assert text.startswith("train split of recipe.yaml: 3 of 6 images cannot be used:")
    assert all(str(p) in text for p in (truncated, not_an_image, missing))
    assert "data.on_bad_record: skip" in text
    with pytest.raises(BadImagesError) as info:
        verify_images(paths, "train split", max_listed=1)
    assert str(truncated) in str(info.value) and str(missing) not in str(info.value)
    assert "... and 2 more" in str(info.value) and len(info.value.problems) == 3


def test_verify_is_fast_and_decode_finds_what_only_decoding_shows(tmp_path, files):
    jpeg = tmp_path / "half.jpg"
    files.write_image(jpeg, size=(64, 48))
    files.corrupt(jpeg, how="truncate")
    # JPEG has no integrity data for verify() to check: a truncated one needs decoding
    assert find_bad_images([jpeg]) == ([], 1)
    problems, _ = find_bad_images([jpeg], decode=True)
    assert [p.reason for p in problems] == [CORRUPT_IMAGE]


def test_bad_record_errors_advise_the_recipe_key(tmp_path):
    error = BadRecordError(tmp_path / "q.json", "question #3", "malformed", "no 'question'")
    assert "set data.on_bad_record: skip in the recipe (on_bad_record='skip' in Python)" in str(
        error
    )
    with pytest.raises(ValueError, match="in a recipe this is the key data.on_bad_record"):
        records.RecordPolicy("warn", tmp_path)
