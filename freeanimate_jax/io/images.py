"""Image loading and the letterbox / crop-back pair that keeps the input's aspect ratio.

Resampling: photos use LANCZOS (sharpest). Skeleton maps use BILINEAR instead: it is what
controlnet_aux resizes pose maps with (``cv2.INTER_LINEAR``), it has no negative lobes (LANCZOS
rings around the hard limb edges and tints the black background), and Pillow widens its support
when shrinking, so it averages like an area filter and a 4-pixel limb dims rather than breaking
up. NEAREST would drop or alias thin limbs and joints on downscaling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

Box = tuple[int, int, int, int]  # (top, left, height, width) of the content inside a canvas
Kind = Literal["image", "pose"]

_RESAMPLE = {"image": Image.Resampling.LANCZOS, "pose": Image.Resampling.BILINEAR}


class InputError(ValueError):
    """An input file that cannot be used; the message is one line naming the file."""


def load_image(
    path: str | Path, *, background: tuple[int, int, int] = (255, 255, 255)
) -> np.ndarray:
    """Read an image as RGB uint8 (H, W, 3), compositing any transparency over ``background``."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            upright = ImageOps.exif_transpose(im)  # phone photos store rotation in EXIF
            if upright.mode in ("RGBA", "LA", "PA") or "transparency" in upright.info:
                rgba = upright.convert("RGBA")
                base = Image.new("RGBA", rgba.size, (*background, 255))
                rgb = Image.alpha_composite(base, rgba).convert("RGB")
            else:
                rgb = upright.convert("RGB")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file; expected an image") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(
            f"{path}: not a readable image ({type(e).__name__}); expected PNG/JPEG/WebP/..."
        ) from None
    return np.asarray(rgb, dtype=np.uint8).copy()


def resize(img: np.ndarray, size_hw: tuple[int, int], kind: Kind = "image") -> np.ndarray:
    """Resize (H, W, 3) uint8, or float (kept float, per channel), to ``size_hw``."""
    h, w = int(size_hw[0]), int(size_hw[1])
    if img.shape[:2] == (h, w):
        return img.copy()
    resample = _RESAMPLE[kind]
    if img.dtype == np.uint8:
        return np.asarray(Image.fromarray(img).resize((w, h), resample))
    # Pillow has no multi-channel float mode; resizing each channel as mode "F" keeps precision.
    chans = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(img[..., c], np.float32)).resize((w, h), resample)
        )
        for c in range(img.shape[-1])
    ]
    return np.stack(chans, axis=-1).astype(img.dtype)


def fit_box(src_hw: tuple[int, int], size_hw: tuple[int, int]) -> Box:
    """Where an image of ``src_hw`` lands when scaled to fit ``size_hw`` and centred."""
    sh, sw = int(src_hw[0]), int(src_hw[1])
    th, tw = int(size_hw[0]), int(size_hw[1])
    scale = min(th / sh, tw / sw)
    h = min(th, max(1, round(sh * scale)))
    w = min(tw, max(1, round(sw * scale)))
    return ((th - h) // 2, (tw - w) // 2, h, w)


def letterbox(
    img: np.ndarray, size_hw: tuple[int, int], kind: Kind = "image"
) -> tuple[np.ndarray, Box]:
    """Scale ``img`` (H, W, C) to fit ``size_hw`` keeping its aspect, centred on black.

    Returns the canvas and the content box (top, left, h, w) for :func:`crop_box`.
    """
    box = fit_box(img.shape[:2], size_hw)
    top, left, h, w = box
    out = np.zeros((int(size_hw[0]), int(size_hw[1]), img.shape[-1]), dtype=img.dtype)
    out[top : top + h, left : left + w] = resize(img, (h, w), kind)
    return out, box


def crop_box(
    frames: np.ndarray,
    box: Box,
    out_hw: tuple[int, int] | None = None,
    kind: Kind = "image",
) -> np.ndarray:
    """Undo :func:`letterbox`: cut the content box out of (F, H, W, C) or (H, W, C) frames and
    resize it to ``out_hw`` (e.g. the reference image's size); None keeps the model's scale."""
    top, left, h, w = box
    crop = frames[..., top : top + h, left : left + w, :]
    if out_hw is None:
        return crop.copy()
    if crop.ndim == 3:
        return resize(crop, out_hw, kind)
    return np.stack([resize(f, out_hw, kind) for f in crop])
