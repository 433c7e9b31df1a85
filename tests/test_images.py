"""backend.images: every image is built here, in memory or in tmp_path."""

from __future__ import annotations

import functools
import io
import os
import socket
import struct
import time
import tracemalloc
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from backend.images import (
    ImageError,
    ImageLimits,
    ImageTooLarge,
    LoadedImage,
    load_image,
    to_grey,
)

# ---------------------------------------------------------------------------------------------
# Builders


def encode(im: Image.Image, fmt: str, **params) -> bytes:
    """`im` encoded as `fmt`."""
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def pattern(width: int = 5, height: int = 3) -> np.ndarray:
    """(H, W, 3) uint8 where every pixel differs, so any flip or rotation is visible."""
    n = width * height
    values = np.arange(n, dtype=np.uint16) * (250 // max(n - 1, 1))
    return (
        np.stack([values, 255 - values, (values * 7) % 256], axis=-1)
        .astype(np.uint8)
        .reshape(height, width, 3)
    )


def blocks(width: int = 64, height: int = 48) -> np.ndarray:
    """Four flat 8-aligned quadrants (red, green, blue, white): survives JPEG almost exactly."""
    out = np.zeros((height, width, 3), np.uint8)
    h2, w2 = height // 2, width // 2
    out[:h2, :w2] = (255, 0, 0)
    out[:h2, w2:] = (0, 255, 0)
    out[h2:, :w2] = (0, 0, 255)
    out[h2:, w2:] = (255, 255, 255)
    return out


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(width: int, height: int, depth: int, colour_type: int, idat: bytes) -> bytes:
    """A PNG assembled by hand: lets tests write what Pillow will not (16-bit RGB, 0x0, bombs)."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def png_from_rows(rows: np.ndarray, depth: int, colour_type: int) -> bytes:
    """PNG of big-endian sample rows (H, W*channels), filter 0 on every row."""
    height = rows.shape[0]
    width = rows.shape[1] // {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    raw = b"".join(b"\x00" + row.astype(f">u{depth // 8}").tobytes() for row in rows)
    return raw_png(width, height, depth, colour_type, zlib.compress(raw))


@functools.cache
def bomb_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of width x height, a few hundred kB for 900 Mpx.

    Compressed row by row so that building it never holds the raw pixels in memory.
    """
    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)
    parts = [comp.compress(row) for _ in range(height)]
    parts.append(comp.flush())
    return raw_png(width, height, 1, 0, b"".join(parts))


def rgb16_tiff(samples: np.ndarray) -> bytes:
    """Uncompressed little-endian 16-bit RGB TIFF (Pillow cannot write one)."""
    height, width, _ = samples.shape
    pixels = samples.astype("<u2").tobytes()
    entries = [  # tag, type (3 SHORT, 4 LONG), count, value
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 3, None),  # BitsPerSample -> offset of (16, 16, 16)
        (259, 3, 1, 1),
        (262, 3, 1, 2),
        (273, 4, 1, None),  # StripOffsets -> pixel data
        (277, 3, 1, 3),
        (278, 4, 1, height),
        (279, 4, 1, len(pixels)),
        (284, 3, 1, 1),
    ]
    ifd_size = 2 + 12 * len(entries) + 4
    bits_at = 8 + ifd_size
    pixels_at = bits_at + 6
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        value = {258: bits_at, 273: pixels_at}.get(tag, value)
        packed = struct.pack("<HI", value, 0)[:4] if kind == 3 and count == 1 else None
        ifd += struct.pack("<HHI", tag, kind, count) + (packed or struct.pack("<I", value))
    ifd += struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<3H", 16, 16, 16) + pixels


def with_orientation(im: Image.Image, fmt: str, orientation: int, **params) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im, fmt, exif=exif, **params)


# ---------------------------------------------------------------------------------------------
# Result shape and basics


def test_result_is_upright_rgb_with_grey():
    arr = pattern(7, 4)
    img = load_image(encode(Image.fromarray(arr), "PNG"))
    assert isinstance(img, LoadedImage)
    assert img.rgb.dtype == np.uint8 and img.rgb.shape == (4, 7, 3)
    assert img.rgb.flags.c_contiguous
    assert (img.width, img.height) == (7, 4)
    assert img.format == "PNG" and img.exif_orientation == 1
    np.testing.assert_array_equal(img.rgb, arr)
    assert img.grey.shape == (4, 7) and img.grey.dtype == np.uint8
    np.testing.assert_array_equal(img.grey, to_grey(arr))


def test_arrays_are_read_only():
    img = load_image(encode(Image.fromarray(pattern()), "PNG"))
    assert not img.rgb.flags.writeable and not img.grey.flags.writeable


def test_to_grey_uses_luma_weights():
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [200, 200, 200]]], np.uint8)
    np.testing.assert_array_equal(to_grey(rgb), [[76, 150, 29, 200]])


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview", "str", "path"])
def test_sources(tmp_path, kind):
    data = encode(Image.fromarray(pattern()), "PNG")
    file = tmp_path / "x.png"
    file.write_bytes(data)
    source = {
        "bytes": data,
        "bytearray": bytearray(data),
        "memoryview": memoryview(data),
        "str": str(file),
        "path": file,
    }[kind]
    np.testing.assert_array_equal(load_image(source).rgb, pattern())


# ---------------------------------------------------------------------------------------------
# Formats


@pytest.mark.parametrize(
    "fmt, params, exact",
    [
        ("JPEG", {"quality": 95}, False),
        ("PNG", {}, True),
        ("WEBP", {"lossless": True}, True),
        ("WEBP", {"quality": 90}, False),
        ("BMP", {}, True),
        ("GIF", {}, True),  # four colours fit the palette exactly
        ("TIFF", {}, True),
        ("TIFF", {"compression": "tiff_lzw"}, True),
    ],
)
def test_formats(fmt, params, exact):
    arr = blocks()
    img = load_image(encode(Image.fromarray(arr), fmt, **params))
    assert img.format == fmt
    assert img.rgb.shape == arr.shape
    if exact:
        np.testing.assert_array_equal(img.rgb, arr)
    else:
        assert np.abs(img.rgb.astype(int) - arr).mean() < 4


def test_format_comes_from_content_not_extension(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(encode(Image.fromarray(pattern()), "PNG"))
    img = load_image(path)
    assert img.format == "PNG"
    np.testing.assert_array_equal(img.rgb, pattern())


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (8, 6), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    img = load_image(data)
    assert img.format == "GIF"
    assert (img.rgb == (255, 0, 0)).all()


def test_animated_webp_gives_first_frame():
    frames = [Image.new("RGB", (8, 6), c) for c in [(255, 0, 0), (0, 0, 255)]]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert (load_image(data).rgb == (255, 0, 0)).all()


def test_multipage_tiff_gives_first_page():
    pages = [Image.new("RGB", (8, 6), c) for c in [(0, 255, 0), (0, 0, 255)]]
    data = encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    assert (load_image(data).rgb == (0, 255, 0)).all()


def test_mpo_camera_jpeg_reports_jpeg_and_first_frame():
    first = Image.fromarray(blocks())
    second = Image.new("RGB", first.size, (0, 0, 0))
    data = encode(first, "MPO", save_all=True, append_images=[second], quality=95)
    assert Image.open(io.BytesIO(data)).format == "MPO"
    img = load_image(data)
    assert img.format == "JPEG"
    assert np.abs(img.rgb.astype(int) - blocks()).mean() < 4


# ---------------------------------------------------------------------------------------------
# Modes


def test_grey_l():
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    img = load_image(encode(Image.fromarray(arr, "L"), "PNG"))
    np.testing.assert_array_equal(img.rgb, np.repeat(arr[..., None], 3, axis=2))
    np.testing.assert_array_equal(img.grey, arr)


def test_la_transparent_is_white_not_black():
    la = np.array([[[0, 0], [0, 255], [100, 255]]], np.uint8)  # invisible black, black, grey
    img = load_image(encode(Image.fromarray(la, "LA"), "PNG"))
    np.testing.assert_array_equal(img.rgb[0, :, 0], [255, 0, 100])


def test_rgba_composited_over_white():
    rgba = np.array([[[0, 0, 0, 0], [10, 20, 30, 255], [0, 0, 0, 128]]], np.uint8)
    img = load_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    np.testing.assert_array_equal(img.rgb[0, 0], (255, 255, 255))
    np.testing.assert_array_equal(img.rgb[0, 1], (10, 20, 30))
    assert np.all(np.abs(img.rgb[0, 2].astype(int) - 127) <= 1)  # half black over white


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
def test_alpha_in_other_formats(fmt):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[:2] = (0, 0, 255, 255)  # top half opaque blue, bottom half transparent black
    params = {"lossless": True} if fmt == "WEBP" else {}
    img = load_image(encode(Image.fromarray(rgba, "RGBA"), fmt, **params))
    assert (img.rgb[:2] == (0, 0, 255)).all()
    assert (img.rgb[2:] == 255).all()


def palette_image() -> Image.Image:
    im = Image.new("P", (3, 1))
    im.putpalette([255, 0, 0, 0, 0, 0, 0, 0, 255])
    im.putdata([0, 1, 2])
    return im


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "BMP"])
def test_palette_without_transparency(fmt):
    img = load_image(encode(palette_image(), fmt))
    np.testing.assert_array_equal(img.rgb[0], [(255, 0, 0), (0, 0, 0), (0, 0, 255)])


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparent_index_is_white(fmt):
    data = encode(palette_image(), fmt, transparency=1)  # the black entry is transparent
    assert "transparency" in Image.open(io.BytesIO(data)).info
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Palette images with Transparency" warning
        img = load_image(data)
    np.testing.assert_array_equal(img.rgb[0], [(255, 0, 0), (255, 255, 255), (0, 0, 255)])


def test_palette_with_per_entry_alpha():
    im = palette_image()
    im.info["transparency"] = bytes([255, 0, 128])  # tRNS: one alpha per palette entry
    img = load_image(encode(im, "PNG"))
    assert tuple(img.rgb[0, 1]) == (255, 255, 255)
    assert abs(int(img.rgb[0, 2, 0]) - 127) <= 1 and img.rgb[0, 2, 2] == 255


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "GIF"])
def test_bilevel_mode_1(fmt):
    im = Image.new("1", (4, 2), 0)
    im.putpixel((1, 0), 1)
    im.putpixel((3, 1), 1)
    img = load_image(encode(im, fmt))
    expected = np.zeros((2, 4), np.uint8)
    expected[0, 1] = expected[1, 3] = 255
    np.testing.assert_array_equal(img.grey, expected)
    np.testing.assert_array_equal(img.rgb[..., 0], expected)


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_is_converted_not_reinterpreted(fmt):
    cmyk = np.zeros((8, 24, 4), np.uint8)
    cmyk[:, :8] = (255, 0, 0, 0)  # cyan
    cmyk[:, 8:16] = (0, 0, 255, 0)  # yellow
    cmyk[:, 16:] = (0, 0, 0, 128)  # half black -> mid grey
    data = encode(Image.fromarray(cmyk, "CMYK"), fmt, **({"quality": 100} if fmt == "JPEG" else {}))
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    img = load_image(data)
    tol = 3 if fmt == "JPEG" else 1
    assert np.abs(img.rgb[4, 4].astype(int) - (0, 255, 255)).max() <= tol
    assert np.abs(img.rgb[4, 12].astype(int) - (255, 255, 0)).max() <= tol
    assert np.abs(img.rgb[4, 20].astype(int) - (127, 127, 127)).max() <= tol


def test_16bit_grey_png_full_range_maps_linearly():
    values = np.array([[0, 16384, 32768, 49152, 65535]])
    data = png_from_rows(values, 16, 0)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    img = load_image(data)
    np.testing.assert_array_equal(img.grey[0], [0, 64, 128, 191, 255])
    np.testing.assert_array_equal(img.rgb[0, :, 0], img.grey[0])


def test_16bit_grey_narrow_range_is_stretched_not_clipped():
    values = np.array([[1000, 2000, 3000]])  # clipping to 255 would give a white image
    img = load_image(png_from_rows(values, 16, 0))
    np.testing.assert_array_equal(img.grey[0], [0, 128, 255])


def test_16bit_big_endian_tiff():
    im = Image.frombytes("I;16B", (3, 1), np.array([0, 30000, 60000], ">u2").tobytes())
    data = encode(im, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I;16B"
    np.testing.assert_array_equal(load_image(data).grey[0], [0, 128, 255])


def test_32bit_int_tiff_with_negatives():
    im = Image.fromarray(np.array([[-500, 0, 500]], np.int32), "I")
    np.testing.assert_array_equal(load_image(encode(im, "TIFF")).grey[0], [0, 128, 255])


def test_float_tiff_ignores_non_finite():
    arr = np.array([[0.25, 0.5, 0.75, np.nan, np.inf]], np.float32)
    img = load_image(encode(Image.fromarray(arr, "F"), "TIFF"))
    np.testing.assert_array_equal(img.grey[0], [0, 128, 255, 0, 0])


def test_flat_wide_image_is_black():
    img = load_image(png_from_rows(np.full((2, 3), 40000), 16, 0))
    assert (img.rgb == 0).all()


def test_16bit_rgb_png():
    samples = np.array([[0, 30000, 65535, 65535, 0, 1000]])  # two RGB pixels
    img = load_image(png_from_rows(samples, 16, 2))
    expected = np.round(samples.reshape(1, 2, 3) / 257.0)
    assert np.abs(img.rgb.astype(int) - expected).max() <= 1


def test_16bit_rgba_png_composited():
    samples = np.array([[65535, 0, 0, 65535, 0, 0, 0, 0]])  # opaque red, transparent black
    img = load_image(png_from_rows(samples, 16, 6))
    np.testing.assert_array_equal(img.rgb[0], [(255, 0, 0), (255, 255, 255)])


def test_16bit_rgb_tiff():
    samples = np.array([[[0, 30000, 65535], [65535, 0, 1000]]])
    img = load_image(rgb16_tiff(samples))
    assert img.format == "TIFF"
    assert np.abs(img.rgb.astype(int) - np.round(samples / 257.0)).max() <= 1


# ---------------------------------------------------------------------------------------------
# EXIF orientation

# Where stored pixel (y, x) lands, per the EXIF spec's (row 0, column 0) placement.
EXPECTED_TRANSPOSE = {
    1: lambda a: a,  # top, left
    2: lambda a: a[:, ::-1],  # top, right
    3: lambda a: a[::-1, ::-1],  # bottom, right
    4: lambda a: a[::-1, :],  # bottom, left
    5: lambda a: a.transpose(1, 0, 2),  # left, top
    6: lambda a: np.rot90(a, -1),  # right, top: turn clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # right, bottom
    8: lambda a: np.rot90(a, 1),  # left, bottom: turn counter-clockwise
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_all_eight(orientation):
    arr = pattern(5, 3)
    data = with_orientation(Image.fromarray(arr), "PNG", orientation)
    img = load_image(data)
    assert img.exif_orientation == orientation
    expected = EXPECTED_TRANSPOSE[orientation](arr)
    np.testing.assert_array_equal(img.rgb, expected)
    np.testing.assert_array_equal(img.grey, to_grey(np.ascontiguousarray(expected)))
    assert (img.width, img.height) == ((3, 5) if orientation >= 5 else (5, 3))
    # ... and it is what Pillow's own exif_transpose does.
    pillow = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    np.testing.assert_array_equal(img.rgb, pillow)


@pytest.mark.parametrize("fmt, params", [("JPEG", {"quality": 95}), ("WEBP", {"lossless": True})])
def test_exif_orientation_in_jpeg_and_webp(fmt, params):
    arr = blocks(64, 48)
    img = load_image(with_orientation(Image.fromarray(arr), fmt, 6, **params))
    assert img.exif_orientation == 6
    assert (img.width, img.height) == (48, 64)
    assert np.abs(img.rgb.astype(int) - np.rot90(arr, -1)).mean() < 4


def test_no_exif_is_orientation_1():
    assert load_image(encode(Image.fromarray(pattern()), "JPEG")).exif_orientation == 1


@pytest.mark.parametrize("value", [0, 9, 65535])
def test_out_of_range_orientation_is_ignored(value):
    arr = pattern()
    img = load_image(with_orientation(Image.fromarray(arr), "PNG", value))
    assert img.exif_orientation == 1
    np.testing.assert_array_equal(img.rgb, arr)


def test_garbage_exif_still_loads():
    data = encode(
        Image.fromarray(pattern()), "PNG", exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7fjunk"
    )
    img = load_image(data)
    assert img.exif_orientation == 1
    np.testing.assert_array_equal(img.rgb, pattern())


def test_huge_exif_in_jpeg_loads_quickly():
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010E] = "x" * 60_000  # ImageDescription: APP1 is capped at 64 kB
    data = encode(Image.fromarray(blocks()), "JPEG", exif=exif.tobytes(), quality=95)
    assert len(data) > 60_000
    start = time.perf_counter()
    img = load_image(data)
    assert time.perf_counter() - start < 2
    assert img.exif_orientation == 6 and (img.width, img.height) == (48, 64)


def test_huge_exif_chunk_in_png_loads_quickly():
    exif = Image.Exif()
    exif[0x0112] = 8
    exif[0x927C] = b"\x00" * 8_000_000  # MakerNote
    exif[0x010E] = "y" * 2_000_000
    data = encode(Image.fromarray(pattern()), "PNG", exif=exif.tobytes())
    assert len(data) > 10_000_000
    start = time.perf_counter()
    img = load_image(data)
    assert time.perf_counter() - start < 2
    assert img.exif_orientation == 8
    np.testing.assert_array_equal(img.rgb, np.rot90(pattern(), 1))


# ---------------------------------------------------------------------------------------------
# Limits


def test_byte_limit_on_bytes():
    data = encode(Image.fromarray(pattern(40, 40)), "PNG")
    with pytest.raises(ImageTooLarge, match=rf"{len(data):,} bytes \(limit 100 bytes\)"):
        load_image(data, ImageLimits(max_bytes=100))
    assert load_image(data, ImageLimits(max_bytes=len(data))).width == 40


def test_byte_limit_checked_before_reading(tmp_path):
    path = tmp_path / "big.jpg"
    with open(path, "wb") as f:  # sparse: 60 MB on paper, nothing on disk
        f.truncate(60 * 1024 * 1024)
    tracemalloc.start()
    try:
        with pytest.raises(ImageError, match=r"62,914,560 bytes \(limit 52,428,800 bytes\)"):
            load_image(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


def test_too_large_is_an_image_error_callers_can_tell_apart():
    assert issubclass(ImageTooLarge, ImageError)
    with pytest.raises(ImageError) as caught:
        load_image(encode(Image.fromarray(pattern(40, 40)), "PNG"), ImageLimits(max_bytes=10))
    assert isinstance(caught.value, ImageTooLarge)
    with pytest.raises(ImageError) as caught:
        load_image(b"not an image at all")
    assert not isinstance(caught.value, ImageTooLarge)


def test_pixel_limit_from_header():
    data = encode(Image.new("RGB", (11, 10)), "PNG")
    with pytest.raises(ImageTooLarge, match=r"11x10 = 110 pixels \(limit 100 pixels\)"):
        load_image(data, ImageLimits(max_pixels=100))
    assert load_image(data, ImageLimits(max_pixels=110)).width == 11


def test_pixel_limit_counts_transposed_image_the_same():
    data = with_orientation(Image.new("RGB", (11, 10)), "PNG", 6)
    with pytest.raises(ImageError, match="110 pixels"):
        load_image(data, ImageLimits(max_pixels=109))


def test_decompression_bomb_rejected_fast_with_bounded_memory():
    data = bomb_png(30_000, 30_000)
    assert len(data) < 1_000_000
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ImageTooLarge, match=r"900,000,000 pixels \(limit 80,000,000 pixels\)"):
            load_image(data)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 2
    assert peak < 100 * 1024 * 1024


def test_pillow_bomb_error_becomes_image_error_even_with_a_higher_limit():
    with pytest.raises(ImageTooLarge, match="900,000,000 pixels"):  # Pillow's hard stop, ~179 Mpx
        load_image(bomb_png(30_000, 30_000), ImageLimits(max_pixels=10**12))


def test_pillow_bomb_warning_never_escapes():
    data = bomb_png(10_000, 9_000)  # 90 Mpx: over Pillow's warning threshold, under its error
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as under `pytest -W error`: a warning would crash
        with pytest.raises(ImageError, match=r"10000x9000 = 90,000,000 pixels"):
            load_image(data)


def test_no_global_state_changed():
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters))
    load_image(encode(Image.fromarray(pattern()), "PNG"))
    with pytest.raises(ImageError):
        load_image(bomb_png(30_000, 30_000))
    after = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters))
    assert after == before
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ---------------------------------------------------------------------------------------------
# Bad input: always ImageError, with a message saying what is wrong


def test_empty_bytes():
    with pytest.raises(ImageError, match="empty file"):
        load_image(b"")


def test_empty_file(tmp_path):
    (tmp_path / "e.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty file"):
        load_image(tmp_path / "e.png")


@pytest.mark.parametrize(
    "data",
    [
        os.urandom(5000),
        bytes(range(256)) * 4,
        b"hello, this is not a picture\n" * 10,
        b"<html><body><img src='x.png'></body></html>",
        b"%PDF-1.4\n%...",
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",  # never to Ghostscript
        b"P6\n2 2\n255\n" + bytes(12),  # PPM: Pillow reads it, we do not accept it
        b"\x00",
    ],
    ids=["random", "binary", "text", "html", "pdf", "eps", "ppm", "one-byte"],
)
def test_not_an_image(data):
    with pytest.raises(ImageError, match="not a recognised image format"):
        load_image(data)


def test_wrong_extension_with_non_image_content(tmp_path):
    path = tmp_path / "face.jpg"
    path.write_text("definitely not a JPEG")
    with pytest.raises(ImageError, match="not a recognised image format"):
        load_image(path)


def test_missing_path(tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match="file not found"):
        load_image(str(tmp_path / "nope.jpg"))


def test_directory(tmp_path):
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)


@pytest.mark.timeout(10)
def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(fifo)


def test_unreadable_file(tmp_path, monkeypatch):
    """A file we may not read (simulated: CI runs as root, which ignores permissions)."""
    path = tmp_path / "secret.png"
    path.write_bytes(encode(Image.fromarray(pattern()), "PNG"))
    real_open = open

    def guarded_open(file, *args, **kwargs):
        if os.fspath(file) == os.fspath(path):
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", guarded_open)
    with pytest.raises(ImageError, match="permission denied"):
        load_image(path)


SVG = b"""<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE svg [ <!ENTITY xxe SYSTEM "file:///etc/passwd"> ]>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink"
     width="100" height="100">
  <image xlink:href="http://198.51.100.7/tracker.png" width="100" height="100"/>
  <text>&xxe;</text>
</svg>
"""


@pytest.mark.parametrize(
    "data",
    [SVG, b"\xef\xbb\xbf  \n" + SVG, b'<svg xmlns="http://www.w3.org/2000/svg"/>'],
    ids=["xml", "bom", "bare"],
)
def test_svg_rejected_without_parsing_or_fetching(data, tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("load_image tried to open a connection")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(ImageError, match="SVG .* not supported"):
        load_image(data)
    path = tmp_path / "face.png"
    path.write_bytes(data)
    with pytest.raises(ImageError, match="SVG"):
        load_image(path)


def noisy_photo(width: int = 640, height: int = 480) -> np.ndarray:
    """A smooth gradient with noise: decodes like a photo, and truncation is detectable."""
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.6, 0.9, 0.999])
def test_truncated_jpeg_is_an_error(fraction):
    data = encode(Image.fromarray(noisy_photo()), "JPEG", quality=90)
    with pytest.raises(ImageError, match="truncated"):
        load_image(data[: int(len(data) * fraction)])


@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.6, 0.9])
def test_truncated_png_is_an_error(fraction):
    data = encode(Image.fromarray(noisy_photo()), "PNG")
    with pytest.raises(ImageError, match="truncated"):
        load_image(data[: int(len(data) * fraction)])


def test_png_missing_only_its_end_chunk_still_loads():
    arr = noisy_photo(64, 48)
    data = encode(Image.fromarray(arr), "PNG")
    assert data.endswith(png_chunk(b"IEND", b""))
    np.testing.assert_array_equal(load_image(data[:-12]).rgb, arr)  # all pixels are present


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # TIFF: its IFD is cut off too
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP"])
def test_header_only_is_an_error(fmt):
    data = encode(Image.fromarray(noisy_photo(64, 48)), fmt)
    with pytest.raises(ImageError):
        load_image(data[:40])


def test_corrupt_pixel_data_is_an_error():
    data = bytearray(encode(Image.fromarray(noisy_photo(64, 48)), "PNG"))
    data[60:200] = b"\xff" * 140  # inside the IDAT stream
    with pytest.raises(ImageError):
        load_image(bytes(data))


@pytest.mark.parametrize("size", [(0, 0), (0, 7), (7, 0)])
def test_zero_size_png(size):
    with pytest.raises(ImageError, match="PNG"):
        load_image(raw_png(*size, 8, 0, zlib.compress(b"")))


def test_zero_size_bmp():
    data = bytearray(encode(Image.new("RGB", (1, 1)), "BMP"))
    data[18:26] = bytes(8)  # width and height fields
    with pytest.raises(ImageError, match="BMP"):
        load_image(bytes(data))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"])
def test_one_pixel_loads(fmt):
    img = load_image(encode(Image.new("RGB", (1, 1), (200, 100, 50)), fmt, quality=100))
    assert img.rgb.shape == (1, 1, 3) and img.grey.shape == (1, 1)
    assert np.abs(img.rgb[0, 0].astype(int) - (200, 100, 50)).max() <= 8


# ---------------------------------------------------------------------------------------------
# Speed


def test_vga_jpeg_loads_in_a_few_ms(tmp_path):
    data = encode(Image.fromarray(noisy_photo()), "JPEG", quality=90)
    path = tmp_path / "vga.jpg"
    path.write_bytes(data)
    load_image(path)  # warm up plugin registration
    timings = []
    for _ in range(15):
        start = time.perf_counter()
        img = load_image(path)
        timings.append(time.perf_counter() - start)
    assert img.rgb.shape == (480, 640, 3)
    assert sorted(timings)[len(timings) // 2] < 0.02  # typically ~3 ms; slack for busy CI
