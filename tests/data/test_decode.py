"""Decoding of every awkward file a crawl holds: right pixels, or a skip with the right reason."""

from __future__ import annotations

import io
import os
import pickle
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from harness.data import decode as decode_module
from harness.data.decode import REASONS, BadImage, decode, open_image, upright_size
from tests.data.bad_corpus import (
    SIZE,
    alpha_ramp,
    corpus_bytes,
    encode,
    gray16,
    png_chunk,
    reference_rgb,
    stored_for_orientation,
    upright_from_stored,
    write_bad_corpus,
)

CORPUS = {name: data for name, data, _ in corpus_bytes()}
REF = reference_rgb().astype(np.int16)  # SIZE (40x24) upright reference picture


def pixels(name: str, reduce: int = 1) -> np.ndarray:
    image = decode(open_image(CORPUS[name]), reduce)
    assert image.mode == "RGB"
    return np.asarray(image).astype(np.int16)


def outcome(src: str | Path | bytes, reduce: int = 1) -> str | None:
    """None when `src` decodes (checking the promised size and mode), else the skip reason."""
    try:
        image = open_image(src)
        size = upright_size(image)
        out = decode(image, reduce)
    except BadImage as err:
        assert err.reason in REASONS and str(err).startswith(f"{err.reason}: ") and "\n" not in str(err)
        return err.reason
    assert out.mode == "RGB" and out.size[0] >= 1 and out.size[1] >= 1
    if reduce == 1:
        assert out.size == size, "upright_size must predict the decoded size"
    return None


def test_corpus_every_file_decodes_or_is_skipped_with_its_reason(tmp_path: Path) -> None:
    expected = write_bad_corpus(tmp_path)
    assert set(expected.values()) >= {None, "empty", "not_image", "truncated", "corrupt", "too_large",
                                      "unreadable"}
    with warnings.catch_warnings(record=True) as caught:  # our filters stay in force
        from_files = {name: outcome(tmp_path / name) for name in expected}
        from_bytes = {name: outcome(data) for name, data, _ in corpus_bytes()}
        reduced = {name: outcome(data, reduce=2) for name, data, _ in corpus_bytes()}
    assert from_files == expected
    assert from_bytes == reduced == {name: reason for name, _, reason in corpus_bytes()}
    assert [str(w.message) for w in caught] == [], "odd files must not spam the log with warnings"


def test_missing_folder_and_unpermitted_files_are_unreadable(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BadImage, match=r"^unreadable: FileNotFoundError") as err:
        open_image(tmp_path / "gone.jpg")
    assert err.value.reason == "unreadable"
    (tmp_path / "folder.jpg").mkdir()
    assert outcome(tmp_path / "folder.jpg") == "unreadable"

    def denied(path: str, mode: str) -> None:  # what open() does without read permission
        raise PermissionError(13, "Permission denied", path)

    with monkeypatch.context() as patch:
        patch.setattr(decode_module, "open", denied, raising=False)
        assert outcome(tmp_path / "any.jpg") == "unreadable"
        patch.setattr(os, "geteuid", lambda: 1000)  # the corpus writes its mode-000 file for non-root
        expected = write_bad_corpus(tmp_path / "as_user")
        assert expected["no_permission.jpg"] == "unreadable"
        assert (tmp_path / "as_user" / "no_permission.jpg").stat().st_mode & 0o777 == 0
    if os.geteuid() == 0:
        pytest.skip("root reads files without read permission")
    locked = tmp_path / "locked.jpg"
    locked.write_bytes(CORPUS["rgb.jpg"])
    locked.chmod(0)
    with pytest.raises(BadImage, match=r"^unreadable: PermissionError"):
        open_image(locked)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gives_the_upright_picture(orientation: int) -> None:
    data = CORPUS[f"exif_orient_{orientation}.jpg"]
    image = open_image(data)
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # EXIF ignored
    assert stored.shape[:2] == stored_for_orientation(reference_rgb(), orientation).shape[:2]
    assert upright_size(image) == SIZE
    upright = np.asarray(decode(image))
    # Exactly the stored pixels moved per the EXIF definition (numpy, not Pillow's table) ...
    np.testing.assert_array_equal(upright, upright_from_stored(stored, orientation))
    # ... which is the picture the camera saw.
    assert np.abs(upright.astype(np.int16) - REF).mean() < 4
    # A decoded image no longer asks to be rotated.
    assert upright_size(decode(open_image(data))) == SIZE


def test_alpha_is_composited_on_white() -> None:
    alpha = alpha_ramp()[..., None] / 255.0
    expected = REF * alpha + 255 * (1 - alpha)
    np.testing.assert_allclose(pixels("rgba.png"), expected, atol=1)
    np.testing.assert_allclose(pixels("rgba.webp"), expected, atol=1)  # lossless webp
    grey = REF[..., :1] * alpha + 255 * (1 - alpha)
    np.testing.assert_allclose(pixels("la.png"), np.repeat(grey, 3, axis=-1), atol=1)
    keyed = pixels("colour_key.png")  # truecolour tRNS: one exact colour is transparent
    assert (keyed[:8, :8] == 255).all() and (keyed[8:] == REF[8:]).all() and (keyed[:, 8:] == REF[:, 8:]).all()
    # Palettes: Pillow's own RGBA view of the palette and tRNS table, on white.
    for name in ("palette_alpha.png", "palette_alpha.gif"):
        rgba = np.asarray(Image.open(io.BytesIO(CORPUS[name])).convert("RGBA")) / 255.0
        on_white = 255 * (rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:]))
        assert (rgba[..., 3] == 0).any(), "the file must have fully transparent pixels"
        np.testing.assert_allclose(pixels(name), on_white, atol=1)


def test_16_bit_is_rescaled_not_clipped() -> None:
    grey = pixels("gray16.png")
    np.testing.assert_allclose(grey, np.repeat(gray16()[..., None] / 257.0, 3, axis=-1), atol=1)
    assert grey.min() == 0 and grey.max() == 255 and len(np.unique(grey)) == 256
    np.testing.assert_array_equal(pixels("rgb16.png"), REF)  # written as v * 257


def test_colour_models_and_containers_decode_to_the_picture() -> None:
    for lossless in ("rgb.png", "rgb.bmp", "multipage.tif"):  # TIFF: page 1, not the black page 2
        np.testing.assert_array_equal(pixels(lossless), REF, err_msg=lossless)
    for lossy in ("rgb.jpg", "progressive.jpg", "rgb.webp", "exif_corrupt.jpg"):
        assert np.abs(pixels(lossy) - REF).mean() < 4, lossy
    assert np.abs(pixels("cmyk.jpg") - REF).mean() < 2  # inverted Adobe CMYK handled
    luma = np.asarray(Image.fromarray(REF.astype(np.uint8)).convert("L")).astype(np.int16)
    for name in ("gray.jpg", "gray.png"):
        grey = pixels(name)
        assert (grey == grey[..., :1]).all() and np.abs(grey[..., 0] - luma).mean() < 2, name
    assert set(np.unique(pixels("bilevel.png"))) == {0, 255}
    palette = np.asarray(Image.fromarray(REF.astype(np.uint8)).quantize(16).convert("RGB"))
    np.testing.assert_array_equal(pixels("palette.png"), palette)
    first_frame = pixels("animated.gif")
    assert (first_frame == (220, 20, 20)).all()


def test_tiny_images_decode_at_any_reduce() -> None:
    for reduce in (1, 2, 8):
        assert pixels("tiny_1x1.jpg", reduce).shape == (1, 1, 3)
        np.testing.assert_array_equal(pixels("tiny_3x2.png", reduce), REF[:2, :3])
    assert np.abs(pixels("tiny_1x1.jpg")[0, 0] - (10, 200, 30)).max() <= 3


def _smooth_jpeg(width: int, height: int, orientation: int = 1) -> tuple[bytes, np.ndarray]:
    upright = reference_rgb((width, height))
    y, x = np.mgrid[0:height, 0:width]
    upright = np.clip(upright + (20 * np.sin(x / 7.0) * np.cos(y / 5.0))[..., None], 0, 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = Image.fromarray(stored_for_orientation(upright, orientation))
    return encode(stored, "JPEG", quality=92, exif=exif.tobytes()), upright


@pytest.mark.parametrize("width, height, orientation", [(256, 192, 1), (257, 193, 1), (256, 192, 6)])
def test_jpeg_reduce_decodes_at_a_fraction_close_to_a_resize(width: int, height: int, orientation: int) -> None:
    data, _ = _smooth_jpeg(width, height, orientation)
    full = decode(open_image(data))
    assert full.size == (width, height)
    for reduce in (2, 4, 8):
        image = open_image(data)
        small = decode(image, reduce)
        # ceil(size / reduce): libjpeg's DCT scaling, also for odd sizes.
        assert small.size == (-(-width // reduce), -(-height // reduce)), reduce
        reference = np.asarray(full.reduce(reduce)).astype(np.int16)  # box filter, same grid
        h, w = reference.shape[:2]
        assert np.abs(np.asarray(small)[:h, :w].astype(np.int16) - reference).mean() < 3, reduce


def test_other_formats_ignore_reduce() -> None:
    assert decode(open_image(CORPUS["rgb.png"]), 4).size == SIZE
    assert decode(open_image(CORPUS["rgb.webp"]), 2).size == SIZE


def test_plain_rgb_jpeg_is_returned_without_a_copy() -> None:
    image = open_image(CORPUS["rgb.jpg"])
    assert image.tile, "open_image must not decode pixels"
    assert decode(image) is image


def test_png_exif_after_the_pixels_agrees_with_upright_size() -> None:
    """Pillow finds such an EXIF chunk only by decoding; upright_size reads the
    header only, so decode must use the same (header) orientation."""
    png = CORPUS["rgb.png"]
    exif = Image.Exif()
    exif[0x0112] = 6
    iend = png.index(b"IEND") - 4
    late = png[:iend] + png_chunk(b"eXIf", exif.tobytes()) + png[iend:]
    image = open_image(late)
    assert decode(image).size == upright_size(open_image(late))


def test_too_large_is_found_in_the_header_before_decoding(monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    with pytest.raises(BadImage, match="^too_large: ") as err:
        open_image(CORPUS["bomb.png"])  # 40000 x 40000 declared, 69 bytes: nothing decoded
    assert err.value.reason == "too_large"
    monkeypatch.setattr(decode_module, "MAX_PIXELS", 40 * 24 - 1)
    with pytest.raises(BadImage, match=r"^too_large: 40x24 = 960 pixels > MAX_PIXELS=959$"):
        open_image(CORPUS["rgb.jpg"])
    monkeypatch.setattr(decode_module, "MAX_FILE_BYTES", 100)
    (tmp_path / "big.jpg").write_bytes(CORPUS["rgb.jpg"])
    with pytest.raises(BadImage, match=r"^too_large: \d+ bytes > MAX_FILE_BYTES=100$"):
        open_image(tmp_path / "big.jpg")


def test_pillow_bomb_warning_turned_error_is_too_large(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs with `-W error` turn Pillow's DecompressionBombWarning into an exception."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # warns above 500, errors above 1000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(BadImage, match="^too_large: DecompressionBombWarning"):
            open_image(CORPUS["rgb.jpg"])  # 960 pixels


@pytest.mark.parametrize("error, reason", [
    (OSError("image file is truncated (3 bytes not processed)"), "truncated"),
    (EOFError(), "truncated"),
    (OSError("broken data stream when reading image file"), "corrupt"),
    (SyntaxError("not a TIFF file"), "corrupt"),
    (ValueError("tile cannot extend outside image"), "corrupt"),
    (struct.error("unpack requires a buffer of 4 bytes"), "corrupt"),
    (IndexError("list index out of range"), "corrupt"),
    (zlib.error("Error -3 while decompressing data"), "corrupt"),
    (Image.DecompressionBombError("Image size exceeds limit"), "too_large"),
    (ValueError("Decompressed data too large for PngImagePlugin.MAX_TEXT_CHUNK"), "too_large"),
    (MemoryError(), "too_large"),
    (OSError("decoder jpeg2k not available"), "unsupported"),
])
def test_every_pillow_failure_becomes_bad_image(error: Exception, reason: str) -> None:
    image = open_image(CORPUS["rgb.png"])

    def fail() -> None:
        raise error

    image.load = fail  # type: ignore[method-assign]
    with pytest.raises(BadImage) as err:
        decode(image)
    assert err.value.reason == reason and err.value.__cause__ is error
    assert str(err.value) == f"{reason}: {type(error).__name__}: {error}".splitlines()[0]


def test_truncated_files_never_become_grey_images() -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    for name in ("truncated_half.jpg", "truncated_half.png"):
        for reduce in (1, 2):
            assert outcome(CORPUS[name], reduce) == "truncated"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_pillow_warnings_are_muted_only_where_they_would_fire() -> None:
    """The corpus files that make Pillow warn really do; decode keeps them quiet."""
    noisy = {"exif_corrupt.jpg": lambda im: im.getexif(), "palette_alpha.png": lambda im: im.convert("RGB")}
    for name, trigger in noisy.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trigger(Image.open(io.BytesIO(CORPUS[name])))
        assert caught, f"{name} should make plain Pillow warn"
        with warnings.catch_warnings(record=True) as caught:
            decode(open_image(CORPUS[name]))
            filters = list(warnings.filters)
            decode(open_image(CORPUS[name]))
            assert warnings.filters == filters, "the filter is installed once, not per image"
        assert not caught, name


def test_bad_image_message_pickle_and_reason_check() -> None:
    err = BadImage("truncated", "OSError: image file is truncated")
    assert str(err) == "truncated: OSError: image file is truncated"
    again = pickle.loads(pickle.dumps(err))  # crosses DataLoader worker processes
    assert (again.reason, again.detail, str(again)) == (err.reason, err.detail, str(err))
    with pytest.raises(ValueError, match="unknown BadImage reason 'nope'"):
        BadImage("nope", "x")
    with pytest.raises(ValueError, match=r"reduce must be one of \(1, 2, 4, 8\)"):
        decode(open_image(CORPUS["rgb.jpg"]), 3)
