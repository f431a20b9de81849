"""One image at a time: open, orient, convert the mode, crop, resize, and encode as PNG.

Every image that enters a shard, and every image read from another tool's shards, goes through
`convert_image`, in this order:
1. EXIF orientation is applied (a portrait photo stored sideways is turned upright).
2. The mode becomes 8-bit grey (L) or RGB: palette images through RGBA; images with alpha (LA,
   RGBA, palette transparency) are composited onto a flat background (white by default); CMYK,
   YCbCr, LAB, HSV via PIL's conversions; 16- and 32-bit integer images (I;16, I) are mapped to
   8 bits by v / 257 (65535 -> 255), 1-bit images to 0/255. Channels then follow `channels`
   (grey -> RGB repeats, RGB -> grey uses ITU-R 601 luma as PIL does).
3. Size, only after all of the above:
   - `center_crop=C`: the central C x C square; an image with a side below C is too small.
   - `resize=S`: a non-square image is first cropped to the central square of its short side
     (ADM's and EDM's dataset tools do the same), then resized to S x S with an antialiased filter.
   - neither: images keep their size (a shard folder needs one size: a different one is an error).

This module imports neither torch nor webdataset: the parallel conversion workers of make_shards
start fast and stay small.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

# Decompression bombs are refused by PIL above ~179 megapixels; keep that guard.
FILTERS = {"bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS, "box": Image.BOX, "bilinear": Image.BILINEAR}


class BadImage(ValueError):
    """An input image that cannot become a training image: it names the file and the reason."""


@dataclass(frozen=True)
class Conversion:
    """What every image becomes. None keeps the source's value."""

    channels: int | None = None  # 1 (grey) or 3 (RGB)
    center_crop: int | None = None  # the central C x C square, before any resize
    resize: int | None = None  # S x S (after cropping a non-square image to its short side)
    background: int = 255  # grey level that transparent pixels are composited onto
    filter: str = "bicubic"  # resampling filter of the resize (bicubic | lanczos | box | bilinear)

    def __post_init__(self) -> None:
        if self.channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        for name in ("center_crop", "resize"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive size, got {value}")
        if not 0 <= self.background <= 255:
            raise ValueError(f"background must be a grey level in 0..255, got {self.background}")
        if self.filter not in FILTERS:
            raise ValueError(f"filter must be one of {', '.join(FILTERS)}, got {self.filter!r}")


def _to_8bit(im: Image.Image, background: int) -> Image.Image:
    """im as mode L or RGB (see the module docstring)."""
    if im.mode in ("L", "RGB") and "transparency" in im.info:  # a tRNS colour key: transparent pixels
        im = im.convert("LA" if im.mode == "L" else "RGBA")
    if im.mode in ("L", "RGB"):
        return im
    if im.mode == "1":
        return im.convert("L")
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float64)
        return Image.fromarray(np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8), "L")
    if im.mode == "F":
        raise ValueError("floating-point images (mode F) have no defined 8-bit range")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode == "PA":
        im = im.convert("RGBA")
    if im.mode in ("LA", "La", "RGBA", "RGBa"):
        grey = im.mode in ("LA", "La")
        im = im.convert("LA" if grey else "RGBA")
        flat = Image.new("L" if grey else "RGB", im.size, background if grey else (background,) * 3)
        flat.paste(im, mask=im.getchannel("A"))
        return flat
    return im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX


def _square(im: Image.Image, side: int) -> Image.Image:
    w, h = im.size
    left, top = (w - side) // 2, (h - side) // 2
    return im.crop((left, top, left + side, top + side))


def convert_image(im: Image.Image, conv: Conversion, name: str = "image") -> np.ndarray:
    """A decoded PIL image as uint8 [C, H, W] under `conv`; BadImage (naming `name`) if it cannot be."""
    try:
        im = ImageOps.exif_transpose(im)
        im = _to_8bit(im, conv.background)
    except (OSError, ValueError, SyntaxError) as e:
        raise BadImage(f"{name}: cannot convert mode {im.mode!r}: {e}") from e
    if conv.channels == 1 and im.mode == "RGB":
        im = im.convert("L")
    elif conv.channels == 3 and im.mode == "L":
        im = im.convert("RGB")
    w, h = im.size
    if conv.center_crop:
        if min(w, h) < conv.center_crop:
            raise BadImage(f"{name}: {w}x{h} pixels is too small for --center-crop {conv.center_crop}")
        im = _square(im, conv.center_crop)
    if conv.resize:
        if im.size[0] != im.size[1]:
            im = _square(im, min(im.size))
        if im.size != (conv.resize, conv.resize):
            im = im.resize((conv.resize, conv.resize), FILTERS[conv.filter])
    arr = np.asarray(im)
    arr = np.ascontiguousarray(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
    return arr if arr.flags.writeable else arr.copy()  # PIL's buffer is read-only; torch wants writable arrays


def open_image(data: bytes | str | os.PathLike, name: str) -> Image.Image:
    """Decode an image file (a path or its bytes) completely, so that truncation shows here."""
    try:
        if isinstance(data, bytes | bytearray):
            if not data:
                raise BadImage(f"{name}: empty (0 bytes)")
            im = Image.open(io.BytesIO(data))
        else:
            if os.path.getsize(data) == 0:
                raise BadImage(f"{name}: empty file (0 bytes)")
            im = Image.open(data)
        im.load()  # decodes all pixels: a truncated or corrupt file raises now, not later
        return im
    except BadImage:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImage(f"{name}: not a readable image ({type(e).__name__}: {e})") from e


def array_image(arr: np.ndarray) -> Image.Image:
    """uint8 [C, H, W] (C = 1 or 3) as a PIL image."""
    return Image.fromarray(np.ascontiguousarray(arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)))


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [C, H, W] (C = 1 or 3) as PNG bytes (lossless)."""
    buf = io.BytesIO()
    array_image(image).save(buf, format="PNG")
    return buf.getvalue()


def _upscaled(width: int, height: int, conv: Conversion) -> bool:
    side = conv.center_crop or min(width, height)
    return conv.resize is not None and side < conv.resize


def encode_items(items: list, conv: Conversion) -> list[tuple[bytes | None, str | None, tuple | None, bool]]:
    """Open, convert and PNG-encode images (make_shards' unit of work, run in a worker process).

    items: objects with `.name` and `.load()` returning a PIL image or a uint8 [C, H, W] array
    (latent_ndm.data.sources). Returns per item (png, None, shape, upscaled) or, for a BadImage,
    (None, message, None, False): the caller decides whether a bad image stops the run.
    """
    out = []
    for item in items:
        try:
            src = item.load()
            if isinstance(src, np.ndarray):
                size = (src.shape[2], src.shape[1])
                trivial = conv.center_crop is None and conv.resize is None and conv.channels in (None, src.shape[0])
                arr = src if trivial else convert_image(array_image(src), conv, item.name)
            else:
                size = src.size
                arr = convert_image(src, conv, item.name)
            out.append((encode_png(arr), None, tuple(arr.shape), _upscaled(*size, conv)))
        except BadImage as e:
            out.append((None, str(e), None, False))
        except Exception as e:  # anything else a malformed file makes PIL raise (struct.error, EOFError, ...)
            out.append((None, f"{item.name}: cannot read or convert this image ({type(e).__name__}: {e})", None,
                        False))
    return out
