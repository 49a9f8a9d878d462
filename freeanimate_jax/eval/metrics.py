"""Per-video metrics against ground truth, as the human-image-animation papers report them on
the TikTok protocol, minus what needs downloaded networks (FID/FVD, LPIPS, a pose detector):

- **L1, PSNR, SSIM**: pixel fidelity (scikit-image's PSNR and SSIM, data range 1).
- **pose** (`pose_iou`): the generated figure's body mask against the ground truth's, IoU per
  frame. A mask is every pixel farther than `FIGURE_THRESHOLD` from the reference's
  background colour, so it does not depend on the clothes coming out right.
  `part_offset`: the distance between the generated and the true centroid of each clothed part
  (pixels nearest that part's reference colour), as a fraction of the frame height.
- **identity**: the CIE76 colour difference (Lab, Delta E) between the reference's shirt,
  trousers and skin colours and the generated frame's mean colour over where the ground truth
  has that part (its interior: one pixel in from the edge, away from antialiasing).
- **temporal** (flicker): `temporal_error`, the mean absolute difference between the generated
  and the true frame-to-frame change; `flicker_ratio`, how much the generated video changes
  from frame to frame against how much the truth does (1: as much; above: flicker).

Videos are (F, H, W, 3) uint8 or floats in [0, 1]; part maps (F, H, W) hold the toy world's
part labels; colours are RGB 0-255.
"""

from __future__ import annotations

import numpy as np
from skimage.color import deltaE_cie76, rgb2lab
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from freeanimate_jax.toy.world import BACKGROUND, SHIRT, SKIN, TROUSER

FIGURE_THRESHOLD = 0.2  # RGB distance in [0, 1] units: farther from the background is figure
IDENTITY_PARTS = {"shirt": SHIRT, "trousers": TROUSER, "skin": SKIN}
METRICS = ("l1", "psnr", "ssim", "pose_iou", "part_offset", "identity", "temporal_error",
           "flicker_ratio")
# Higher is better for these; lower for the rest.
HIGHER_IS_BETTER = ("psnr", "ssim", "pose_iou")


def as_float(video: np.ndarray) -> np.ndarray:
    v = np.asarray(video)
    if v.dtype == np.uint8:
        return v.astype(np.float64) / 255.0
    return v.astype(np.float64)


def _check(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"videos of shapes {a.shape} and {b.shape}; expected the same "
                         f"(F, H, W, 3)")


def l1(gen: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean(np.abs(as_float(gen) - as_float(truth))))


def psnr(gen: np.ndarray, truth: np.ndarray) -> float:
    """Over the whole video (one MSE); inf for identical videos."""
    g, t = as_float(gen), as_float(truth)
    if np.array_equal(g, t):
        return float("inf")
    return float(peak_signal_noise_ratio(t, g, data_range=1.0))


def ssim(gen: np.ndarray, truth: np.ndarray) -> float:
    """Mean over frames of SSIM on RGB (scikit-image, 7x7 window)."""
    g, t = as_float(gen), as_float(truth)
    return float(np.mean([structural_similarity(tf, gf, channel_axis=-1, data_range=1.0)
                          for gf, tf in zip(g, t, strict=True)]))


def figure_mask(video: np.ndarray, background_rgb: tuple[int, int, int]) -> np.ndarray:
    """(F, H, W) bool: pixels farther than FIGURE_THRESHOLD from the background colour."""
    bg = np.asarray(background_rgb, np.float64) / 255.0
    return np.linalg.norm(as_float(video) - bg, axis=-1) > FIGURE_THRESHOLD


def pose_iou(gen: np.ndarray, truth: np.ndarray, background_rgb: tuple[int, int, int]
             ) -> float:
    """Mean over frames of IoU(generated figure mask, true figure mask), both masks by the
    same colour rule (so antialiased edges count alike and the truth scores exactly 1)."""
    got = figure_mask(gen, background_rgb)
    want = figure_mask(truth, background_rgb)
    inter = np.sum(got & want, axis=(1, 2))
    union = np.sum(got | want, axis=(1, 2))
    return float(np.mean(np.where(union > 0, inter / np.maximum(union, 1), 1.0)))


def nearest_part(video: np.ndarray, colors: dict[int, tuple[int, int, int]]) -> np.ndarray:
    """(F, H, W) label of the reference colour nearest each pixel."""
    labels = np.array(list(colors), np.int64)
    palette = np.asarray([colors[k] for k in labels], np.float64) / 255.0
    d = np.linalg.norm(as_float(video)[..., None, :] - palette, axis=-1)
    return labels[np.argmin(d, axis=-1)]


def part_offset(gen: np.ndarray, parts: np.ndarray, colors: dict[int, tuple[int, int, int]]
                ) -> float:
    """Mean centroid distance of the clothed parts (fraction of the frame height); a part the
    generated frame lacks counts as the farthest any centroid could be (the distance from the
    true centroid to the frame's farthest corner), so losing a part never scores better than
    misplacing it. Pixels are labelled by the nearest reference colour, so parts of close
    colours (dark skin, brown hair) trade some edge pixels even in the truth."""
    got = nearest_part(gen, colors)
    parts = np.asarray(parts)
    h, w = parts.shape[1:3]
    yy, xx = np.mgrid[0:h, 0:w]
    errors = []
    for f in range(parts.shape[0]):
        for label in IDENTITY_PARTS.values():
            want = parts[f] == label
            if not want.any():
                continue
            have = got[f] == label
            c_want = np.array([yy[want].mean(), xx[want].mean()])
            if not have.any():
                corners = np.array([[0, 0], [0, w - 1], [h - 1, 0], [h - 1, w - 1]])
                errors.append(float(np.max(np.linalg.norm(corners - c_want, axis=1))) / h)
                continue
            c_have = np.array([yy[have].mean(), xx[have].mean()])
            errors.append(float(np.linalg.norm(c_want - c_have)) / h)
    return float(np.mean(errors)) if errors else 0.0


def _interior(mask: np.ndarray) -> np.ndarray:
    """The mask less its one-pixel border (3x3 erosion), per frame: the pixels no edge of the
    drawing reaches."""
    m = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
    h, w = mask.shape[1:]
    return np.all([m[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)


def identity(gen: np.ndarray, parts: np.ndarray, colors: dict[int, tuple[int, int, int]]
             ) -> float:
    """Mean Delta E (CIE76) over shirt, trousers, skin and frames between the reference colour
    and the generated mean colour inside the true part (interior; the whole part if it has
    none). Frames without a part skip it."""
    g = as_float(gen)
    parts = np.asarray(parts)
    dists = []
    for label in IDENTITY_PARTS.values():
        want = parts == label
        inner = _interior(want)
        ref_lab = rgb2lab(np.asarray(colors[label], np.float64)[None, None] / 255.0)
        for f in range(parts.shape[0]):
            m = inner[f] if inner[f].any() else want[f]
            if not m.any():
                continue
            mean = g[f][m].mean(axis=0)
            dists.append(float(deltaE_cie76(ref_lab, rgb2lab(mean[None, None]))[0, 0]))
    return float(np.mean(dists)) if dists else 0.0


def temporal_error(gen: np.ndarray, truth: np.ndarray) -> float:
    """Mean |(g[t+1] - g[t]) - (y[t+1] - y[t])|: change that the truth does not have."""
    g, t = as_float(gen), as_float(truth)
    if g.shape[0] < 2:
        return 0.0
    return float(np.mean(np.abs(np.diff(g, axis=0) - np.diff(t, axis=0))))


def flicker_ratio(gen: np.ndarray, truth: np.ndarray) -> float:
    """mean|g[t+1] - g[t]| / mean|y[t+1] - y[t]| (1 for a static truth matched exactly)."""
    g, t = as_float(gen), as_float(truth)
    if g.shape[0] < 2:
        return 1.0
    dg, dt = np.mean(np.abs(np.diff(g, axis=0))), np.mean(np.abs(np.diff(t, axis=0)))
    if dt == 0:
        return 1.0 if dg == 0 else float("inf")
    return float(dg / dt)


def evaluate(gen: np.ndarray, truth: np.ndarray, parts: np.ndarray,
             colors: dict[int, tuple[int, int, int]]) -> dict[str, float]:
    """Every metric of one video (METRICS order)."""
    _check(np.asarray(gen), np.asarray(truth))
    if np.asarray(parts).shape != np.asarray(truth).shape[:3]:
        raise ValueError(f"part maps of shape {np.asarray(parts).shape}; expected "
                         f"{np.asarray(truth).shape[:3]}")
    return {"l1": l1(gen, truth), "psnr": psnr(gen, truth), "ssim": ssim(gen, truth),
            "pose_iou": pose_iou(gen, truth, colors[BACKGROUND]),
            "part_offset": part_offset(gen, parts, colors),
            "identity": identity(gen, parts, colors),
            "temporal_error": temporal_error(gen, truth),
            "flicker_ratio": flicker_ratio(gen, truth)}
