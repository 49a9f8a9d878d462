"""The toy world's datasets: rows `{videoid, caption, frames, condition}` (the figure's frames
and its openpose skeletons), as an in-memory source for the trainer (`data.source=toy`) and as
tensorflow-datasets configs written as ArrayRecord (`image`, `image_pose`, `video`).

A row is a pure function of (split, seed, index). Training rows draw their appearance from the
training outfits and their motion from the training motions; held-out rows only from what
training never sees (`world.HELD_OUT_OUTFITS`, `motions.HELD_OUT_MOTION`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import numpy as np

from freeanimate_jax.data.errors import DataError
from freeanimate_jax.toy import motions, world

KINDS = ("image", "image_pose", "video")
SPLITS = ("train", "held_out")


@dataclasses.dataclass(frozen=True)
class Case:
    """One clip of the world: who, doing what, drawn how."""

    appearance: world.Appearance
    motion: str
    seed: int
    frames: int
    size: int

    def keypoints_units(self) -> np.ndarray:
        return motions.clip(self.motion, self.frames, self.seed)

    def keypoints(self) -> np.ndarray:
        """(F, 18, 3) pixel keypoints at the case's size."""
        return world.to_pixels(self.keypoints_units(), (self.size, self.size))

    def video(self) -> np.ndarray:
        return world.render_video(self.keypoints(), self.appearance, (self.size, self.size))

    def parts(self) -> np.ndarray:
        return world.part_maps(self.keypoints(), (self.size, self.size))

    def poses(self, size_hw: tuple[int, int] | None = None) -> np.ndarray:
        """The clip's openpose skeletons, (F, H, W, 3) uint8, at the case's size (or letterboxed
        to `size_hw`, as a keypoint JSON of a square canvas loads)."""
        return world.pose_images(self.keypoints_units(), size_hw or (self.size, self.size))

    def reference(self, size: int | None = None) -> np.ndarray:
        """The case's figure standing at rest where the clip's figure stands, (S, S, 3) uint8:
        the reference image that animating the clip starts from."""
        first = self.keypoints_units()[0]
        hip = (first[8, :2] + first[11, :2]) / 2  # r_hip, l_hip
        height = float(np.linalg.norm(first[1, :2] - hip)) / motions.TORSO  # neck-to-hip
        rest = motions.keypoints(motions.Skeleton(hip_x=float(hip[0]), hip_y=float(hip[1])),
                                 height)
        hw = (size or self.size,) * 2
        return world.render_frame(world.to_pixels(rest, hw), self.appearance, hw)

    def to_dict(self) -> dict:
        return {"appearance": dataclasses.asdict(self.appearance), "motion": self.motion,
                "seed": self.seed, "frames": self.frames, "size": self.size}

    @classmethod
    def from_dict(cls, d: dict) -> Case:
        try:
            return cls(world.Appearance(**d["appearance"]), str(d["motion"]), int(d["seed"]),
                       int(d["frames"]), int(d["size"]))
        except (KeyError, TypeError) as e:
            raise DataError(f"toy case {d!r} lacks or misnames {e}; expected appearance, "
                            f"motion, seed, frames, size") from None


def case(split: str, seed: int, index: int, frames: int, size: int) -> Case:
    """The index-th case of a split (pure of its arguments)."""
    if split not in SPLITS:
        raise DataError(f"toy split {split!r}; expected one of {', '.join(SPLITS)}")
    rng = np.random.default_rng((seed, index, SPLITS.index(split)))
    appearance = world.sample_appearance(rng, held_out=split == "held_out")
    pool = motions.TRAIN_MOTIONS if split == "train" else tuple(motions.MOTIONS)
    motion = pool[int(rng.integers(len(pool)))]
    return Case(appearance, motion, int(rng.integers(2**31)), frames, size)


def held_out_cases(appearances: int = 8, motion_names: tuple[str, ...] = (
        motions.HELD_OUT_MOTION, "wave"), seeds: tuple[int, ...] = (0, 1, 2),
        frames: int = 16, size: int = 64) -> list[tuple[str, Case, int]]:
    """(name, case, sampling seed): one appearance per held-out outfit (skin, hair and
    background drawn from a fixed stream), each doing each motion, each sampled with each
    seed; the clip itself (speed, phase, size) is fixed per (appearance, motion)."""
    rng = np.random.default_rng(2024)
    pool = world.all_appearances(held_out=True)
    out = []
    for a in range(appearances):
        shirt, trousers = world.HELD_OUT_OUTFITS[a % len(world.HELD_OUT_OUTFITS)]
        options = [p for p in pool if (p.shirt, p.trousers) == (shirt, trousers)]
        appearance = options[int(rng.integers(len(options)))]
        for m in motion_names:
            c = Case(appearance, m, 1000 + a, frames, size)
            for s in seeds:
                out.append((f"a{a}-{m}-s{s}", c, s))
    return out


def demo_case(frames: int = 16, size: int = 64) -> Case:
    """The demos' case: the held-out set's first appearance (an outfit never trained on) doing
    the held-out motion, the ablation's `a0-jumping_jacks`."""
    return held_out_cases(1, (motions.HELD_OUT_MOTION,), (0,), frames, size)[0][1]


def row(c: Case, videoid: str, condition: bool = True) -> dict:
    out = {"videoid": videoid, "caption": c.appearance.caption, "frames": c.video()}
    if condition:
        out["condition"] = c.poses()
    return out


class ToySource:
    """Random-access rows of a split (`len`, `[i]`), rendered once and kept (a few hundred
    MB at most for the recipes' sizes)."""

    def __init__(self, num_videos: int = 512, num_frames: int = 16, size: int = 64,
                 seed: int = 0, split: str = "train"):
        if num_videos < 1 or num_frames < 1 or size < 16:
            raise DataError(f"toy source got num_videos={num_videos}, num_frames={num_frames}, "
                            f"size={size}; expected >= 1, >= 1 and >= 16")
        self.num_videos, self.num_frames, self.size = num_videos, num_frames, size
        self.seed, self.split = seed, split
        self._row = functools.lru_cache(maxsize=num_videos)(self._render)

    def __len__(self) -> int:
        return self.num_videos

    def _render(self, index: int) -> dict:
        c = case(self.split, self.seed, index, self.num_frames, self.size)
        return row(c, f"toy-{self.split}-{index:06d}")

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_videos:
            raise IndexError(f"toy index {index} out of range [0, {self.num_videos})")
        return self._row(int(index))


# -- tensorflow-datasets ----------------------------------------------------------------------

@functools.cache  # tfds registers a builder class by name, once per process
def _builder_class():
    import tensorflow_datasets as tfds

    from freeanimate_jax.data import builder as _webvid  # noqa: F401  (pins tfds offline)

    @dataclasses.dataclass(eq=False)
    class ToyConfig(tfds.core.BuilderConfig):
        kind: str = "video"
        size: int = 64
        num_videos: int = 512
        num_frames: int = 16
        seed: int = 0

    class ToyWorld(tfds.core.GeneratorBasedBuilder):
        """The toy world's figures: `image` (one frame and its caption), `image_pose` (+ its
        skeleton), `video` (clips + skeletons); `train` and `held_out` splits."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "Image, image+pose and video configs."}
        BUILDER_CONFIGS = [ToyConfig(name=k, kind=k, num_frames=1 if k != "video" else 16)
                           for k in KINDS]

        def _info(self):
            cfg = self.builder_config
            shape = (None, cfg.size, cfg.size, 3)
            features = {"videoid": tfds.features.Text(), "caption": tfds.features.Text(),
                        "frames": tfds.features.Video(shape=shape, encoding_format="png")}
            if cfg.kind != "image":
                features["condition"] = tfds.features.Video(shape=shape, encoding_format="png")
            return tfds.core.DatasetInfo(builder=self, description=self.__doc__,
                                         features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            return {s: self._generate_examples(s) for s in SPLITS}

        def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
            cfg = self.builder_config
            n = cfg.num_videos if split == "train" else max(1, cfg.num_videos // 8)
            for i in range(n):
                c = case(split, cfg.seed, i, cfg.num_frames, cfg.size)
                key = f"toy-{split}-{i:06d}"
                yield key, row(c, key, condition=cfg.kind != "image")

    return ToyConfig, ToyWorld


def _builder(data_dir: str, kind: str, size: int, num_videos: int, num_frames: int,
             seed: int):
    """The ToyWorld builder of one config; its name holds every setting that changes what is
    stored, so variants live side by side under one data dir."""
    config_cls, builder_cls = _builder_class()
    name = f"{kind}_{size}px_{num_videos}x{num_frames}f_seed{seed}"
    return builder_cls(data_dir=str(data_dir), config=config_cls(
        name=name, kind=kind, size=size, num_videos=num_videos, num_frames=num_frames,
        seed=seed))


def prepare(data_dir: str, kind: str = "video", *, size: int = 64, num_videos: int = 512,
            num_frames: int | None = None, seed: int = 0):
    """Write a config of the toy world under `data_dir` as ArrayRecord (reused if there)."""
    import tensorflow_datasets as tfds

    if kind not in KINDS:
        raise DataError(f"toy kind {kind!r}; expected one of {', '.join(KINDS)}")
    frames = num_frames if num_frames is not None else (16 if kind == "video" else 1)
    builder = _builder(data_dir, kind, size, num_videos, frames, seed)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
        file_format="array_record")
    return builder


def open_prepared(data_dir: str, num_videos: int, num_frames: int, size: int,
                  kind: str = "video", seed: int = 0):
    """The prepared `train` split of a toy config as a random-access source."""
    builder = _builder(data_dir, kind, size, num_videos, num_frames, seed)
    if not builder.is_prepared():
        raise DataError(f"no prepared toy dataset {builder.builder_config.name} under "
                        f"{data_dir}; expected "
                        f"`freeanimate_jax.toy.data.prepare` to have written it")
    return builder.as_data_source("train")
