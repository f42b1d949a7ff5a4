"""A corpus of every awkward image file a crawl holds, generated in a few ms.

`corpus_bytes()` gives (file name, encoded bytes, expected outcome) triples:
the outcome is the `harness.data.decode.BadImage` reason the file must be
skipped with, or None for a file that must decode. `write_bad_corpus(folder)`
writes them as files, plus the cases only a file system has (a dangling
symlink; a file without read permission, unless running as root, which
ignores permissions). The lead's pipeline tests put the same bytes into tar
shards. Images are tiny and synthetic (numpy + Pillow), so the corpus needs
no download and no fixtures on disk.
"""

from __future__ import annotations

import functools
import io
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from harness.data.decode import MAX_PIXELS

# (width, height) of the upright reference most cases are made from.
SIZE = (40, 24)


def reference_rgb(size: tuple[int, int] = SIZE) -> np.ndarray:
    """An asymmetric, smooth (JPEG-friendly) HxWx3 uint8 picture.

    Smooth so that lossy codecs keep it within a few levels; asymmetric (each
    quadrant a different colour ramp) so that every flip and rotation changes
    it.
    """
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    red = 40 + 170 * x / max(1, width - 1)
    green = 30 + 180 * y / max(1, height - 1)
    blue = np.where((x < width / 2) & (y < height / 2), 220.0, 50.0)
    return np.stack([red, green, blue], axis=-1).round().astype(np.uint8)


def stored_for_orientation(upright: np.ndarray, orientation: int) -> np.ndarray:
    """The pixels a camera stores so that EXIF `orientation` shows `upright`.

    Inverse of the EXIF 2.32 definitions (tag 0x0112), written with numpy so
    the test does not check Pillow's transpose table against itself.
    """
    inverse = {
        1: lambda a: a,
        2: np.fliplr,
        3: lambda a: np.rot90(a, 2),
        4: np.flipud,
        5: lambda a: a.transpose(1, 0, 2),
        6: lambda a: np.rot90(a, 1),   # shown rotated 90 deg clockwise
        7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
        8: lambda a: np.rot90(a, -1),  # shown rotated 90 deg counter-clockwise
    }
    return np.ascontiguousarray(inverse[orientation](upright))


def upright_from_stored(stored: np.ndarray, orientation: int) -> np.ndarray:
    """What a viewer shows for `stored` pixels tagged with EXIF `orientation`."""
    forward = {
        1: lambda a: a,
        2: np.fliplr,
        3: lambda a: np.rot90(a, 2),
        4: np.flipud,
        5: lambda a: a.transpose(1, 0, 2),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
        8: lambda a: np.rot90(a, 1),
    }
    return np.ascontiguousarray(forward[orientation](stored))


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def raw_png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes | None) -> bytes:
    """A PNG written by hand: for what Pillow cannot save (16-bit RGB) and
    for headers that lie (a 40000x40000 "image" of a few bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    idat = zlib.compress(rows if rows is not None else b"\x00" * 64)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


def png16_rgb(values: np.ndarray) -> bytes:
    """An HxWx3 uint16 array as a 16-bit RGB PNG (filter byte 0 per row)."""
    height, width, _ = values.shape
    big_endian = values.astype(">u2").reshape(height, width * 3).view(np.uint8)
    rows = b"".join(b"\x00" + row.tobytes() for row in big_endian)
    return raw_png(width, height, 16, 2, rows)


def gray16() -> np.ndarray:
    """A 16-bit ramp over the whole range: clipping at 255 would flatten it."""
    return np.linspace(0, 65535, SIZE[0] * SIZE[1]).round().astype(np.uint16).reshape(SIZE[1], SIZE[0])


def alpha_ramp() -> np.ndarray:
    """HxW alpha from fully transparent (left) to opaque (right)."""
    return np.broadcast_to(np.linspace(0, 255, SIZE[0]).round().astype(np.uint8), (SIZE[1], SIZE[0])).copy()


KEY = (1, 2, 3)  # the RGB colour a truecolour PNG's tRNS chunk makes transparent


def _keyed(picture: np.ndarray) -> np.ndarray:
    """The picture with its top-left 8x8 block set to the transparent colour `KEY`."""
    keyed = picture.copy()
    keyed[:8, :8] = KEY
    return keyed


def _textured(size: tuple[int, int]) -> np.ndarray:
    noise = np.random.default_rng(13).integers(-40, 41, (size[1], size[0], 3))
    return np.clip(reference_rgb(size) + noise, 0, 255).astype(np.uint8)


def _corrupt_exif() -> bytes:
    """EXIF whose one tag points past its end: Pillow warns "Possibly corrupt
    EXIF data" while reading it (real cameras and editors write such files)."""
    ifd = struct.pack("<H", 1) + struct.pack("<HHII", 0x010F, 2, 1000, 100) + struct.pack("<I", 0)
    return b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + ifd


def _bomb_side() -> int:
    return math.isqrt(MAX_PIXELS) + 1  # just over our limit, under Pillow's own (179 MP)


@functools.cache
def corpus_bytes() -> tuple[tuple[str, bytes, str | None], ...]:
    """(name, bytes, expected BadImage reason or None) for every in-memory case.

    Names are unique "<key>.<ext>" with a single dot, usable as tar members.
    """
    ref = reference_rgb()
    rgb = Image.fromarray(ref)
    jpg = encode(rgb, "JPEG", quality=92)
    # Cut and damaged files start from a noisy picture, so that the cut lands
    # in the image data, not in the headers a tiny smooth file is mostly made of.
    textured = Image.fromarray(_textured((96, 64)))
    noisy_jpg = encode(textured, "JPEG", quality=85)  # ~3 KB
    noisy_png = encode(textured.resize(SIZE), "PNG")  # ~3 KB
    sof = noisy_jpg.index(b"\xff\xc0")  # start of frame: length, precision, height, width
    dht = noisy_jpg.index(b"\xff\xc4")  # first Huffman table: length, class, 16 code counts
    cases: list[tuple[str, bytes, str | None]] = [
        ("rgb.jpg", jpg, None),
        ("progressive.jpg", encode(rgb, "JPEG", quality=92, progressive=True), None),
        ("gray.jpg", encode(rgb.convert("L"), "JPEG", quality=92), None),
        ("cmyk.jpg", encode(rgb.convert("CMYK"), "JPEG", quality=95), None),
        ("rgb.png", encode(rgb, "PNG"), None),
        ("gray.png", encode(rgb.convert("L"), "PNG"), None),
        ("bilevel.png", encode(rgb.convert("1"), "PNG"), None),
        ("gray16.png", encode(Image.fromarray(gray16()), "PNG"), None),
        ("rgb16.png", png16_rgb(ref.astype(np.uint16) * 257), None),
        ("rgba.png", encode(Image.fromarray(np.dstack([ref, alpha_ramp()]), "RGBA"), "PNG"), None),
        ("la.png", encode(Image.fromarray(np.dstack([ref[..., 0], alpha_ramp()]), "LA"), "PNG"), None),
        ("palette.png", encode(rgb.quantize(16), "PNG"), None),
        ("colour_key.png", encode(Image.fromarray(_keyed(ref)), "PNG", transparency=KEY), None),
        ("palette_alpha.png", _palette_with_alpha(rgb), None),
        ("palette_alpha.gif", _gif_with_transparency(rgb), None),
        ("animated.gif", _animated_gif(), None),
        ("multipage.tif", _multipage_tiff(rgb), None),
        ("rgb.webp", encode(rgb, "WEBP", quality=90), None),
        ("rgba.webp", encode(Image.fromarray(np.dstack([ref, alpha_ramp()]), "RGBA"), "WEBP",
                             lossless=True), None),
        ("rgb.bmp", encode(rgb, "BMP"), None),
        ("tiny_1x1.jpg", encode(Image.new("RGB", (1, 1), (10, 200, 30)), "JPEG"), None),
        ("tiny_3x2.png", encode(Image.fromarray(ref[:2, :3]), "PNG"), None),
        ("exif_corrupt.jpg", encode(rgb, "JPEG", quality=92, exif=_corrupt_exif()), None),
    ]
    for orientation in range(1, 9):
        stored = Image.fromarray(stored_for_orientation(ref, orientation))
        exif = Image.Exif()
        exif[0x0112] = orientation
        cases.append((f"exif_orient_{orientation}.jpg",
                      encode(stored, "JPEG", quality=95, exif=exif.tobytes()), None))
    side = _bomb_side()
    cases += [
        ("empty.jpg", b"", "empty"),
        ("text.jpg", b"this is a text file, not a photograph\n" * 20, "not_image"),
        ("html.png", b"<!doctype html><html><body><h1>404 Not Found</h1></body></html>\n", "not_image"),
        ("zeros.jpg", b"\x00" * 4096, "not_image"),
        ("truncated_half.jpg", noisy_jpg[: len(noisy_jpg) // 2], "truncated"),
        ("truncated_header.jpg", noisy_jpg[:200], "truncated"),
        ("truncated_half.png", noisy_png[: len(noisy_png) // 2], "truncated"),
        # Random bytes inside the entropy-coded data are not used: libjpeg
        # decodes some of them into garbage pixels without an error, which
        # depends on the bytes and the libjpeg version. Broken tables always fail.
        ("corrupt_huffman.jpg", noisy_jpg[: dht + 5] + b"\xff" * 16 + noisy_jpg[dht + 21:], "corrupt"),
        ("corrupt_header.jpg", noisy_jpg[: sof + 7] + b"\x00\x00" + noisy_jpg[sof + 9:], "corrupt"),
        ("corrupt_crc.png", noisy_png[:29] + bytes([noisy_png[29] ^ 0xFF]) + noisy_png[30:], "corrupt"),
        ("corrupt_idat.png", _png_with_garbage_idat(), "corrupt"),
        ("bomb.png", raw_png(40_000, 40_000, 8, 2, None), "too_large"),
        ("bomb_limit.png", raw_png(side, side, 8, 0, None), "too_large"),
        ("bomb.gif", b"GIF89a" + struct.pack("<HHBBB", 65535, 65535, 0, 0, 0)
         + b",\x00\x00\x00\x00\xff\xff\xff\xff\x00\x02\x02D\x01\x00;", "too_large"),
    ]
    return tuple(cases)


def write_bad_corpus(folder: Path) -> dict[str, str | None]:
    """Write the corpus into `folder`: {file name: expected reason or None}.

    Beyond `corpus_bytes()`: "dangling_link.jpg", a symlink to nothing, and
    "no_permission.jpg", mode 000 (left out when running as root, for whom
    it would read fine). Both must be skipped as "unreadable".
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str | None] = {}
    for name, data, outcome in corpus_bytes():
        (folder / name).write_bytes(data)
        expected[name] = outcome
    link = folder / "dangling_link.jpg"
    link.symlink_to(folder / "deleted_before_reading.jpg")
    expected[link.name] = "unreadable"
    if os.geteuid() != 0:
        locked = folder / "no_permission.jpg"
        locked.write_bytes(dict((n, d) for n, d, _ in corpus_bytes())["rgb.jpg"])
        locked.chmod(0)
        expected[locked.name] = "unreadable"
    return expected


def _palette_with_alpha(rgb: Image.Image) -> bytes:
    """P image with a per-entry alpha table (PNG tRNS as bytes): the case
    Pillow warns about when converted straight to RGB."""
    palette = rgb.quantize(8)
    alphas = bytes([0, 255, 128, 255, 64, 255, 200, 255])
    return encode(palette, "PNG", transparency=alphas)


def _gif_with_transparency(rgb: Image.Image) -> bytes:
    palette = rgb.quantize(8)
    return encode(palette, "GIF", transparency=0)


def _animated_gif() -> bytes:
    """Three frames; the first (red) is the one to decode."""
    frames = [Image.new("RGB", SIZE, colour) for colour in ((220, 20, 20), (20, 220, 20), (20, 20, 220))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _multipage_tiff(rgb: Image.Image) -> bytes:
    """Page 1 is the reference, page 2 black: the first page is decoded."""
    return encode(rgb, "TIFF", save_all=True, append_images=[Image.new("RGB", (8, 8))])


def _png_with_garbage_idat() -> bytes:
    """Valid chunk structure and CRCs, but the compressed stream is noise."""
    noise = np.random.default_rng(7).integers(0, 256, 400, dtype=np.uint8).tobytes()
    width, height = SIZE
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", noise)
            + png_chunk(b"IEND", b""))
