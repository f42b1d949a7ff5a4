"""One image file -> upright 8-bit RGB, or a `BadImage` that says why not.

A crawl of internet images (SEER's data: random, uncurated photos) holds
every way a file can be wrong: empty downloads, HTML error pages saved as
`.jpg`, files cut off mid-transfer, CMYK and 16-bit files, palettes with
transparency, phone photos stored sideways with an EXIF orientation tag,
and the odd absurdly large or hostile header. The data path must decode the
good ones correctly, skip the rest, and count the skips by reason; so every
failure leaves this module as `BadImage(reason, detail)`, and nothing else
does.

Decoding is split in two so that a caller can plan a crop before paying
for the pixels: `open_image` parses only the header (size, format, EXIF),
`upright_size` gives the size a viewer would show, and `decode(image,
reduce)` decodes, asking libjpeg for a 1/2, 1/4 or 1/8 scale decode when
`reduce` allows it (JPEG DCT scaling through PIL's `Image.draft`, the cheap
path torchvision's `decode_jpeg` lacks on the CPU). Pillow does the work
(format support and fuzzing maturity no hand-written decoder matches); this
module adds only what Pillow leaves to the caller:

- a truncated file must be a skip, never a silently grey-filled image:
  `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` stays False (we never touch it);
- the pixel limit is ours (`MAX_PIXELS`), checked on the header before any
  pixel is decoded;
- only the formats of photo crawls are accepted (`ACCEPTED_FORMATS`), so a
  PostScript file named `.jpg` is not handed to Ghostscript by Pillow's EPS
  plugin;
- conversion to RGB keeps what a viewer shows (alpha composited on white,
  16-bit rescaled, not clipped), and the EXIF orientation is applied the
  way `PIL.ImageOps.exif_transpose` does, without its extra copy of
  already-upright images.
"""

from __future__ import annotations

import functools
import io
import os
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

# Why a file was skipped; the loader counts and reports skips by these names.
REASONS: tuple[str, ...] = (
    "empty",        # zero bytes
    "unreadable",   # missing, permission denied, a folder, an I/O error
    "not_image",    # no accepted image format recognised (text, HTML, zeros, ...)
    "truncated",    # the file ends before the image data does
    "corrupt",      # malformed header or image data
    "too_large",    # over MAX_PIXELS / MAX_FILE_BYTES, or out of memory decoding it
    "unsupported",  # a valid file Pillow cannot decode here (codec, compression or mode)
)

# Declared pixels above which a file is skipped unread. 2**27 (134 MP, 400 MB
# as RGB) is far above any photo of internet size (0.3-2 MP), and below
# Pillow's own hard limit (2 x Image.MAX_IMAGE_PIXELS = 179 MP by default),
# so this is the limit that applies; Pillow's warning above 89 MP is muted
# (see below) as this check replaces it.
MAX_PIXELS: int = 2**27
# Files are read whole into memory (one read, and the same path as bytes from
# a tar shard); a file larger than this is skipped before reading it.
MAX_FILE_BYTES: int = 2**30

# Pillow format names accepted: the formats of photo crawls. MPO (multi-
# picture JPEGs from cameras) opens through the JPEG entry.
ACCEPTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF")

# EXIF orientation -> the transpose that makes the stored pixels upright
# (EXIF 2.32 tag 0x0112; the same table as PIL.ImageOps.exif_transpose).
_ORIENTATION_TAG = 0x0112
_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_SIZE = frozenset((5, 6, 7, 8))
_WHITE = (255, 255, 255)
_REDUCTIONS = (1, 2, 4, 8)  # the scales libjpeg's DCT can decode at

# Leading bytes of the accepted formats: an unidentifiable file that starts
# like one of them is a damaged image ("corrupt"), not a stray non-image.
_SIGNATURES: tuple[bytes, ...] = (
    b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM",
    b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+",
)

# Odd but decodable files make Pillow warn ("Possibly corrupt EXIF data",
# "Palette images with Transparency expressed in bytes ...", decompression
# bomb above 89 MP); over a billion files these would flood the log while the
# image itself decodes fine. They are muted by a filter installed once here
# rather than `warnings.catch_warnings()` around each decode: that context
# manager is not thread-safe before Python 3.14 (decoding threads would race
# on the global filter list) and every use resets all warning registries, so
# any other once-per-place warning in the process would repeat per image.
# The filter matches only warnings raised inside Pillow's own modules, and
# is appended, so a filter the user set (`-W error`, `simplefilter("always")`)
# still wins. `open_image` puts it back if a `catch_warnings` block that was
# open when this module was imported (pytest's collection, for one) dropped it.
def _add_pillow_filters() -> None:
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.", append=True)
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning, append=True)


with warnings.catch_warnings():  # a scratch list, to learn the entries as this Python stores them
    warnings.resetwarnings()
    _add_pillow_filters()
    _MUTED = tuple(warnings.filters)


def _mute_pillow_warnings() -> None:
    if not all(entry in warnings.filters for entry in _MUTED):  # ~1 us: a list of ~10 tuples
        _add_pillow_filters()


_mute_pillow_warnings()


class BadImage(Exception):
    """An image file that cannot be decoded; `.reason` is one of `REASONS`.

    `str(err)` is "<reason>: <detail>", one line, ready for a log.
    """

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown BadImage reason {reason!r}; expected one of {REASONS}")
        super().__init__(reason, detail)  # args kept, so it pickles across worker processes
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


def open_image(src: str | os.PathLike[str] | bytes) -> Image.Image:
    """Parse the header of a file (path) or of encoded bytes (a tar member).

    The returned image knows its size, format and EXIF, but no pixel is
    decoded yet: pass it to `decode`. Raises `BadImage` for a missing,
    unreadable, empty, unrecognised or oversized file.
    """
    _mute_pillow_warnings()
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src) if not isinstance(src, bytes) else src
    else:
        data = _read(os.fspath(src))
    if not data:
        raise BadImage("empty", "0 bytes")
    try:
        image = Image.open(io.BytesIO(data), formats=_accepted_formats())
    except UnidentifiedImageError:
        if data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
            raise BadImage("corrupt", f"unreadable image header (starts with {data[:12]!r})") from None
        raise BadImage(
            "not_image", f"not a {'/'.join(ACCEPTED_FORMATS)} file (starts with {data[:12]!r})"
        ) from None
    except Exception as err:  # noqa: BLE001 - any parser failure is a bad file, see _bad
        raise _bad(err) from err
    _check_size(image)
    return image


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as displayed, i.e. after the EXIF orientation.

    For an image from `open_image` (before `decode`, which may shrink it):
    equals `decode(image, reduce=1).size`. Reads the header only.
    """
    width, height = image.size
    return (height, width) if _orientation(image) in _SWAPS_SIZE else (width, height)


def decode(image: Image.Image, reduce: int = 1) -> Image.Image:
    """Decode `image` (from `open_image`) to upright 8-bit RGB.

    `reduce` in {1, 2, 4, 8} asks for about `upright_size / reduce`: JPEGs
    are decoded at that scale by libjpeg (several times faster than decoding
    in full and resizing), other formats ignore it and come back full size,
    so callers must use the returned size. A plain RGB JPEG without an EXIF
    rotation is returned as is, with no copy or conversion (the hot path).
    Raises `BadImage` for every failure of the file; ValueError for a bad
    `reduce` (a caller's bug, not the file's).
    """
    if reduce not in _REDUCTIONS:
        raise ValueError(f"decode(reduce={reduce!r}): reduce must be one of {_REDUCTIONS}")
    _check_size(image)
    # Before load: a PNG's EXIF after its pixel data only shows up once
    # loaded, and upright_size (called before decode) cannot have seen it.
    orientation = _orientation(image)
    try:
        if reduce > 1:
            # draft() works on the stored (not upright) size and picks the
            # largest scale s in {1,2,4,8} with s <= min(w // size_w, h // size_h);
            # asking for w // reduce (not ceil(w / reduce)) guarantees s = reduce
            # for odd sizes too. A no-op for non-JPEG formats.
            width, height = image.size
            image.draft("RGB", (max(1, width // reduce), max(1, height // reduce)))
        image.load()
        rgb = to_rgb(image)
        if orientation in _TRANSPOSE:
            rgb = rgb.transpose(_TRANSPOSE[orientation])
            rgb.info = {}  # the copied EXIF would still say "rotate me"
    except Exception as err:  # noqa: BLE001 - any decoder failure is a bad file, see _bad
        raise _bad(err) from err
    return rgb


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size > MAX_FILE_BYTES:
                raise BadImage("too_large", f"{size} bytes > MAX_FILE_BYTES={MAX_FILE_BYTES}")
            return file.read()
    except OSError as err:  # missing, permission denied, a folder, EIO ...
        raise BadImage("unreadable", f"{type(err).__name__}: {err.strerror or err}") from err


@functools.cache
def _accepted_formats() -> tuple[str, ...]:
    # Image.open raises KeyError for a format name without a plugin (AVIF
    # before Pillow 11.2), so keep only the ones this Pillow registers.
    Image.init()
    return tuple(name for name in ACCEPTED_FORMATS if name in Image.OPEN)


def _check_size(image: Image.Image) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise BadImage("corrupt", f"header declares a {width}x{height} image")
    if width * height > MAX_PIXELS:
        raise BadImage(
            "too_large", f"{width}x{height} = {width * height} pixels > MAX_PIXELS={MAX_PIXELS}"
        )


def _orientation(image: Image.Image) -> int:
    """The EXIF (or XMP) orientation, 1 when absent, unreadable or invalid."""
    try:
        # The base-class method: PngImageFile.getexif would decode every
        # pixel to look for an EXIF chunk after the image data.
        value = Image.Image.getexif(image).get(_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - broken EXIF: show the pixels as stored
        return 1
    return value if value in _TRANSPOSE else 1


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB as a viewer shows it.

    Plain `convert("RGB")` is wrong in two cases: transparent pixels would
    show their hidden colour (we composite onto white, as a browser on a
    white page does) and 16-bit greyscale would be clipped at 255 (we
    rescale it).
    """
    mode = image.mode
    transparent = "transparency" in image.info  # palette/L/RGB colour-key tRNS
    if mode == "RGB" and not transparent:
        return image  # the common JPEG: no copy
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or transparent:
        rgba = image if mode in ("RGBA", "LA") else image.convert("RGBA")
        out = Image.new("RGB", image.size, _WHITE)
        out.paste(rgba, (0, 0), rgba)  # straight alpha: out = a*src + (1-a)*white
        return out
    if mode.startswith("I;16"):
        # Exact inverse of the usual 8 -> 16 bit expansion (v * 257).
        return Image.fromarray((np.asarray(image) >> 8).astype(np.uint8), "L").convert("RGB")
    if mode in ("I", "F"):
        # 32-bit int or float: no declared range. Values above 255 are taken
        # as 16-bit samples, floats within [0, 1] as normalised intensities.
        values = np.asarray(image, dtype=np.float64)
        top = float(values.max()) if values.size else 0.0
        scale = 255.0 if mode == "F" and top <= 1.0 else (1 / 257 if top > 255 else 1.0)
        grey = np.clip(values * scale + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX


def _bad(err: BaseException) -> BadImage:
    """Map whatever Pillow raised to a BadImage reason.

    Pillow signals bad files with many exception types (OSError,
    SyntaxError, ValueError, EOFError, struct.error, IndexError, ...), so
    the reason comes from the type where it is specific and from the
    message otherwise; anything unrecognised is "corrupt".
    """
    if isinstance(err, BadImage):
        return err
    text = f"{type(err).__name__}: {err}".splitlines()[0][:300]
    message = str(err).lower()
    if isinstance(err, (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError)) \
            or "too large" in message:  # e.g. a PNG text chunk inflating past Pillow's limit
        return BadImage("too_large", text)
    if isinstance(err, EOFError) or "truncated" in message:
        return BadImage("truncated", text)
    if "not available" in message or "unsupported" in message or "not supported" in message:
        return BadImage("unsupported", text)
    return BadImage("corrupt", text)
