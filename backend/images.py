"""Images in: bytes or a path -> an upright RGB array, or an ImageError the user can act on.

Everything downstream works in the coordinates Label Studio shows, so the EXIF orientation is
applied here and nowhere else. Input is untrusted: sizes are checked before decoding (bytes
before reading, pixels from the header before the pixel data is touched), only a short list
of raster formats is ever handed to a decoder, and every decoder failure becomes ImageError.
"""

from __future__ import annotations

import io
import os
import re
import stat
import warnings
from dataclasses import dataclass, field
from functools import cache

import cv2
import numpy as np
from PIL import Image

# What a browser shows and Pillow decodes natively. MPO is how Pillow names camera JPEGs that
# carry extra frames (depth maps, previews); the first frame is the photo.
_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF")
_FORMAT_NAMES = {"MPO": "JPEG"}

# Modes whose alpha must be composited away (over white, as a page would show them).
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
# Modes with more than 8 bits per sample, or signed/float samples: contrast-stretched to 0..255.
_WIDE_GREY = re.compile(r"^(I|F)(;.*)?$")

# Leading bytes of the allowed formats: a file that starts like one but will not open is damaged.
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)

_ORIENTATION_TAG = 0x0112
# Same table as PIL.ImageOps.exif_transpose; ours skips its copy for 1 and its EXIF rewrite.
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageError(ValueError):
    """An image that cannot be used; the message is meant for the user (per task)."""


class ImageTooLarge(ImageError):
    """An image over the byte or pixel limit (refused before decoding)."""


@dataclass(frozen=True)
class ImageLimits:
    """Ceilings checked before any decoding, so one hostile upload cannot exhaust a worker."""

    max_bytes: int = 50 * 1024 * 1024
    max_pixels: int = 80_000_000  # width*height after EXIF transpose; larger -> ImageError


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image, upright as Label Studio displays it. Arrays are read-only."""

    rgb: np.ndarray  # (H, W, 3) uint8, EXIF-transposed (what Label Studio displays)
    format: str  # e.g. "JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"
    exif_orientation: int  # 1..8 as read (1 when absent or invalid)
    grey: np.ndarray = field(repr=False)  # (H, W) uint8, to_grey(rgb), computed once

    @property
    def width(self) -> int:
        """Columns of the transposed image (x runs 0..width)."""
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        """Rows of the transposed image (y runs 0..height)."""
        return int(self.rgb.shape[0])


def to_grey(rgb: np.ndarray) -> np.ndarray:
    """(H, W) uint8 luma of an RGB image: detectors run on grey, and this is computed once."""
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def load_image(
    source: bytes | str | os.PathLike, limits: ImageLimits = ImageLimits()
) -> LoadedImage:
    """Decode `source` (encoded bytes or a file path) into an upright RGB image.

    The format comes from the content, never the file name. Raises ImageError, and only
    ImageError, for anything that is not a usable image.
    """
    data = _read_source(source, limits)
    _reject_non_raster(data)
    rgb, fmt, orientation = _decode(data, limits)
    rgb.setflags(write=False)
    grey = to_grey(rgb)
    grey.setflags(write=False)
    return LoadedImage(rgb=rgb, format=fmt, exif_orientation=orientation, grey=grey)


def _read_source(source: bytes | str | os.PathLike, limits: ImageLimits) -> bytes:
    """The encoded bytes, refusing oversized input before reading it all."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        data = _read_file(os.fspath(source), limits)
    _check_bytes(len(data), limits)
    if not data:
        raise ImageError("empty file")
    return data


def _read_file(path: str | bytes, limits: ImageLimits) -> bytes:
    """Read a regular file, at most one byte past the limit (the file may grow meanwhile)."""
    shown = os.fsdecode(path)
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise ImageError(f"{shown!r} is a directory, not an image file")
        if not stat.S_ISREG(st.st_mode):  # FIFOs and devices could block or never end
            raise ImageError(f"{shown!r} is not a regular file")
        _check_bytes(st.st_size, limits)
        with open(path, "rb") as f:
            return f.read(limits.max_bytes + 1)
    except FileNotFoundError:
        raise ImageError(f"file not found: {shown!r}") from None
    except PermissionError:
        raise ImageError(f"permission denied reading {shown!r}") from None
    except OSError as e:
        raise ImageError(f"cannot read {shown!r}: {e.strerror or e}") from None


def _check_bytes(size: int, limits: ImageLimits) -> None:
    """Refuse files over the byte limit; the message names both numbers."""
    if size > limits.max_bytes:
        raise ImageTooLarge(f"file is too large: {size:,} bytes (limit {limits.max_bytes:,} bytes)")


def _reject_non_raster(data: bytes) -> None:
    """Say plainly that SVG is unsupported; it is only sniffed, never parsed or fetched."""
    head = data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"<") and b"<svg" in head:
        raise ImageError("SVG (vector) images are not supported; use JPEG, PNG or WebP")


@cache
def _open_formats() -> tuple[str, ...]:
    """The allowed formats this Pillow build can open (WebP support is optional)."""
    Image.init()
    return tuple(f for f in _FORMATS if f in Image.OPEN)


def _decode(data: bytes, limits: ImageLimits) -> tuple[np.ndarray, str, int]:
    """Open, size-check, decode, convert and transpose; every failure becomes ImageError."""
    supported = ", ".join(f for f in _open_formats() if f not in _FORMAT_NAMES)
    try:
        with warnings.catch_warnings():
            # Our pixel limit is the authority; Pillow's warning threshold (~89 Mpx) would
            # otherwise reject images that a raised limit allows. Its hard error still applies.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=_open_formats()) as im:
                fmt = _FORMAT_NAMES.get(im.format or "", im.format or "")
                _check_pixels(im.size, limits)
                im.load()  # decode now, so truncation surfaces here rather than later
                orientation = _orientation(im)
                rgb_im = _to_rgb(im)
                method = _TRANSPOSE.get(orientation)
                if method is not None:
                    rgb_im = rgb_im.transpose(method)
                rgb = np.asarray(rgb_im)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(_bomb_message(str(e), limits)) from None
    except Image.UnidentifiedImageError:
        claimed = _claimed_format(data)
        if claimed:
            raise ImageError(f"damaged {claimed} file: its header cannot be read") from None
        raise ImageError(f"not a recognised image format (supported: {supported})") from None
    except Exception as e:  # decoders raise OSError, SyntaxError, EOFError, ValueError, ...
        raise ImageError(f"cannot decode image (damaged or truncated file?): {e}") from None
    return rgb, fmt, orientation


def _claimed_format(data: bytes) -> str | None:
    """The allowed format whose signature `data` starts with, if any."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in _SIGNATURES if data.startswith(magic)), None)


def _check_pixels(size: tuple[int, int], limits: ImageLimits) -> None:
    """Refuse empty images and, from the header alone, images over the pixel limit."""
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if width * height > limits.max_pixels:
        raise ImageTooLarge(
            f"image is too large: {width}x{height} = {width * height:,} pixels "
            f"(limit {limits.max_pixels:,} pixels)"
        )


def _bomb_message(pillow_message: str, limits: ImageLimits) -> str:
    """Pillow's decompression-bomb refusal, phrased like our own pixel-limit message."""
    found = re.search(r"\((\d+) pixels\)", pillow_message)
    size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
    pillow_max = Image.MAX_IMAGE_PIXELS
    limit = limits.max_pixels if pillow_max is None else min(limits.max_pixels, 2 * pillow_max)
    return f"image is too large: {size} (limit {limit:,} pixels)"


def _orientation(im: Image.Image) -> int:
    """EXIF orientation 1..8; damaged or odd EXIF counts as upright, as browsers treat it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Corrupt EXIF data": handled by counting it as 1
            value = im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # malformed EXIF must not cost the user the image
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB: transparency over white, wide grey stretched, everything else via Pillow."""
    if im.mode == "RGB":
        return im
    if _WIDE_GREY.match(im.mode):  # a tRNS grey level in a 16-bit PNG is ignored here
        return Image.fromarray(_stretch_to_uint8(np.asarray(im)), mode="L").convert("RGB")
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        return _over_white(im.convert("RGBA"))
    try:
        return im.convert("RGB")  # includes CMYK (Adobe-inverted JPEGs are undone on decode)
    except ValueError:
        raise ImageError(f"unsupported colour mode {im.mode!r}") from None


def _over_white(rgba: Image.Image) -> Image.Image:
    """Composite over white: transparent backgrounds would otherwise decode as black."""
    out = Image.new("RGB", rgba.size, (255, 255, 255))
    out.paste(rgba, mask=rgba)
    return out


def _stretch_to_uint8(values: np.ndarray) -> np.ndarray:
    """Map the actual value range linearly onto 0..255 (clipping would lose 16-bit images)."""
    values = values.astype(np.float32, copy=False)
    finite = np.isfinite(values)
    if not finite.all():
        values = np.where(finite, values, np.nan)
    if not finite.any():
        return np.zeros(values.shape, np.uint8)
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    if hi <= lo:  # flat image: nothing to stretch
        return np.zeros(values.shape, np.uint8)
    scaled = (values - lo) * np.float32(255.0 / (hi - lo))
    return np.nan_to_num(np.rint(scaled), nan=0.0).astype(np.uint8)
