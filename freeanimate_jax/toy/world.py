"""The toy world: a person-like figure drawn from the 18 OpenPose keypoints, dressed from a
small vocabulary, with a caption that names its clothes, and ground-truth frames for any
appearance and any pose sequence.

Everything is a pure function of its arguments (no global random state), so a case rendered
today is the same frame, byte for byte, on any machine. Frames are drawn 4x larger with PIL
and downsampled (antialiased edges); the part map (which body part covers each pixel) is drawn
the same way and sampled at pixel centres, for the metrics.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
from PIL import Image, ImageDraw

from freeanimate_jax.io.images import letterbox
from freeanimate_jax.pose.keypoints import KEYPOINT_NAMES
from freeanimate_jax.pose.render import render_sequence

# Colour vocabulary (RGB). Names are single words so a caption stays short for a byte-level
# tokenizer (every caption is under 75 bytes, the CLIP context less its two markers).
SHIRTS = {"red": (205, 40, 40), "orange": (240, 140, 30), "yellow": (235, 210, 50),
          "green": (50, 160, 70), "blue": (45, 85, 200), "purple": (130, 60, 170),
          "pink": (240, 130, 180), "white": (240, 240, 240)}
TROUSERS = {"black": (30, 30, 35), "blue": (40, 60, 140), "brown": (110, 70, 40),
            "grey": (120, 120, 125), "green": (40, 100, 50), "white": (235, 235, 230)}
SKINS = {"light": (245, 210, 180), "tan": (215, 165, 120), "brown": (150, 100, 65),
         "dark": (95, 60, 40)}
HAIRS = {"black": (20, 20, 20), "brown": (90, 55, 30), "blond": (230, 200, 110),
         "red": (170, 60, 30)}
BACKGROUNDS = {"grey": (150, 150, 150), "white": (250, 250, 250), "beige": (225, 210, 180),
               "blue": (150, 190, 230), "green": (160, 205, 150)}

# Part labels of the part map; PARTS[i] is label i.
PARTS = ("background", "skin", "hair", "shirt", "trousers")
BACKGROUND, SKIN, HAIR, SHIRT, TROUSER = range(len(PARTS))

# (shirt, trousers) pairs never drawn for training: the held-out appearances.
HELD_OUT_OUTFITS = (("red", "grey"), ("orange", "blue"), ("yellow", "black"),
                    ("green", "white"), ("blue", "brown"), ("purple", "black"),
                    ("pink", "blue"), ("white", "green"))
SUPERSAMPLE = 4
POSE_CANVAS = 256  # skeletons are drawn at this canvas, then scaled like a keypoint JSON's


@dataclasses.dataclass(frozen=True)
class Appearance:
    """What the figure wears and where it stands; each field is a vocabulary word."""

    shirt: str
    trousers: str
    skin: str
    hair: str
    background: str

    def __post_init__(self):
        for field, vocab in (("shirt", SHIRTS), ("trousers", TROUSERS), ("skin", SKINS),
                             ("hair", HAIRS), ("background", BACKGROUNDS)):
            if getattr(self, field) not in vocab:
                raise ValueError(f"appearance {field}={getattr(self, field)!r}; expected one "
                                 f"of {', '.join(vocab)}")

    @property
    def caption(self) -> str:
        return (f"a person in {_article(self.shirt)} {self.shirt} shirt and {self.trousers} "
                f"trousers on {_article(self.background)} {self.background} background")

    @property
    def held_out(self) -> bool:
        return (self.shirt, self.trousers) in HELD_OUT_OUTFITS

    def colors(self) -> dict[int, tuple[int, int, int]]:
        """Part label -> RGB."""
        return {BACKGROUND: BACKGROUNDS[self.background], SKIN: SKINS[self.skin],
                HAIR: HAIRS[self.hair], SHIRT: SHIRTS[self.shirt],
                TROUSER: TROUSERS[self.trousers]}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def all_appearances(held_out: bool | None = None) -> list[Appearance]:
    """Every appearance whose clothes differ from its background, in a fixed order; with
    `held_out` True/False only the held-out / training ones."""
    out = []
    for s, t, k, h, b in itertools.product(SHIRTS, TROUSERS, SKINS, HAIRS, BACKGROUNDS):
        if b in (s, t):  # a white shirt on a white background is not a figure
            continue
        a = Appearance(s, t, k, h, b)
        if held_out is None or a.held_out == held_out:
            out.append(a)
    return out


def sample_appearance(rng: np.random.Generator, held_out: bool = False) -> Appearance:
    pool = all_appearances(held_out)
    return pool[int(rng.integers(len(pool)))]


def parse_caption(caption: str) -> tuple[str, str, str]:
    """(shirt, trousers, background) named by a caption `Appearance.caption` wrote."""
    words = caption.split()
    try:
        return words[words.index("shirt") - 1], words[words.index("trousers") - 1], \
            words[words.index("background") - 1]
    except (ValueError, IndexError):
        raise ValueError(f"caption {caption!r} is not a toy-world caption; expected 'a person "
                         f"in a(n) <colour> shirt and <colour> trousers on a <colour> "
                         f"background'") from None


# -- drawing --------------------------------------------------------------------------------

# Widths in units of the figure's scale: the neck-to-hip distance.
_LIMB_WIDTH = {"arm": 0.22, "leg": 0.28, "neck": 0.18}
_HEAD_RADIUS = 0.30


def _points(kp: np.ndarray) -> dict[str, np.ndarray]:
    return {name: np.asarray(kp[k, :2], np.float64) for k, name in enumerate(KEYPOINT_NAMES)}


def _draw(kp: np.ndarray, size_hw: tuple[int, int], colors: dict[int, tuple]) -> Image.Image:
    """The figure of (18, 3) pixel keypoints (at `size_hw`) in `colors` (label -> fill),
    drawn SUPERSAMPLE x larger."""
    s = SUPERSAMPLE
    h, w = size_hw
    img = Image.new("RGB", (w * s, h * s), colors[BACKGROUND])
    draw = ImageDraw.Draw(img)
    p = {k: v * s for k, v in _points(kp).items()}
    hip_c = (p["r_hip"] + p["l_hip"]) / 2
    scale = float(np.linalg.norm(p["neck"] - hip_c))

    def limb(names, color, width):
        pts = [tuple(p[n]) for n in names]
        wpx = max(1.0, width * scale)
        draw.line(pts, fill=color, width=round(wpx), joint="curve")
        r = wpx / 2
        for x, y in pts:  # round caps and joints
            draw.ellipse((x - r, y - r, x + r, y + r), fill=color)

    trousers, shirt, skin, hair = (colors[k] for k in (TROUSER, SHIRT, SKIN, HAIR))
    for side in ("r", "l"):
        limb((f"{side}_hip", f"{side}_knee", f"{side}_ankle"), trousers, _LIMB_WIDTH["leg"])
    # The waistband joins the legs under the shirt.
    limb(("r_hip", "l_hip"), trousers, _LIMB_WIDTH["leg"])
    limb(("neck", "nose"), skin, _LIMB_WIDTH["neck"])
    torso = [p["r_shoulder"], p["l_shoulder"], p["l_hip"], p["r_hip"]]
    draw.polygon([tuple(q) for q in torso], fill=shirt)
    limb(("r_shoulder", "l_shoulder"), shirt, _LIMB_WIDTH["arm"])
    for side in ("r", "l"):
        limb((f"{side}_elbow", f"{side}_wrist"), skin, _LIMB_WIDTH["arm"] * 0.85)
        limb((f"{side}_shoulder", f"{side}_elbow"), shirt, _LIMB_WIDTH["arm"])  # sleeves
    # Head: a disc about the face points, hair over its top (and the back, seen from aside).
    face = np.stack([p[n] for n in ("nose", "r_eye", "l_eye", "r_ear", "l_ear")])
    cx, cy = face.mean(axis=0)
    r = _HEAD_RADIUS * scale
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=skin)
    draw.pieslice((cx - r, cy - r, cx + r, cy + r), 180, 360, fill=hair)
    return img


def render_frame(kp: np.ndarray, appearance: Appearance, size_hw: tuple[int, int]
                 ) -> np.ndarray:
    """The figure in `appearance` at (18, 3) pixel keypoints: (H, W, 3) uint8."""
    big = _draw(kp, size_hw, appearance.colors())
    # Box averaging: an edge pixel blends the colours it covers, an interior pixel keeps its
    # colour exactly (a wider kernel would ring into the flat areas the metrics read).
    small = big.resize((size_hw[1], size_hw[0]), Image.Resampling.BOX)
    return np.asarray(small, np.uint8).copy()


def part_map(kp: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 part label of each pixel centre (PARTS)."""
    labels = {k: (k, k, k) for k in range(len(PARTS))}
    big = np.asarray(_draw(kp, size_hw, labels))[..., 0]
    c = SUPERSAMPLE // 2
    return big[c::SUPERSAMPLE, c::SUPERSAMPLE].copy()


def render_video(keypoints: np.ndarray, appearance: Appearance, size_hw: tuple[int, int]
                 ) -> np.ndarray:
    """Ground-truth frames (F, H, W, 3) uint8 of (F, 18, 3) pixel keypoints."""
    return np.stack([render_frame(k, appearance, size_hw) for k in keypoints])


def part_maps(keypoints: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    return np.stack([part_map(k, size_hw) for k in keypoints])


def pose_images(keypoints_units: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """The ControlNet's input for keypoints in canvas units: skeletons drawn by the openpose
    renderer on a POSE_CANVAS canvas and scaled to `size_hw`, exactly as a keypoint JSON of
    that canvas is loaded (`pose.load_poses`)."""
    canvas = (POSE_CANVAS, POSE_CANVAS)
    drawn = render_sequence(to_pixels(keypoints_units, canvas), canvas)
    return np.stack([letterbox(f, size_hw, kind="pose")[0] for f in drawn])


def to_pixels(keypoints_units: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Canvas units (x, y in [0, 1] of the width and height) -> pixel keypoints."""
    out = np.array(keypoints_units, np.float64, copy=True)
    out[..., 0] *= size_hw[1]
    out[..., 1] *= size_hw[0]
    return out
