"""`WebVidFolder`: a tensorflow-datasets builder for a local WebVid-layout folder (or synthetic
moving shapes), written as ArrayRecord fully offline, plus `prepare` / `open_source`.

Layout of the manual dir: `results.csv` with columns `videoid,name,page_dir` (`name` is the
caption); each video at `{root}/{videoid}.mp4`, else `{root}/{page_dir}/{videoid}.mp4`.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import gcs_utils

from freeanimate_jax.data.errors import DataError
from freeanimate_jax.data.synthetic import moving_shape
from freeanimate_jax.data.video import decode_video, resize_short_side_and_crop

LOG = logging.getLogger("freeanimate_jax.data")
# tfds 4.9.10 already ships with GCS lookups off; pin it, because with them on every builder
# construction probes gs://tfds-data for metadata (network access, long timeouts offline).
gcs_utils._is_gcs_disabled = True

STORAGES = ("frames", "bytes", "synthetic")
COLUMNS = ("videoid", "name", "page_dir")
_CONFIG_KEYS = ("max_frames", "num_videos", "num_frames", "seed")
PREPARE_HINT = "freeanimate train prepare-data --manual-dir DIR --data-dir {data_dir} --config {s}"


@dataclasses.dataclass(frozen=True)
class VideoRow:
    videoid: str
    caption: str
    path: Path | None  # None: no file at either place the layout allows


def read_index(root: str | Path) -> list[VideoRow]:
    """Rows of `{root}/results.csv`, each with its video path resolved (or None if absent)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"manual dir {root} does not exist; expected a folder holding "
                        "results.csv and the videos (WebVid layout)")
    index = root / "results.csv"
    if not index.is_file():
        raise DataError(f"no results.csv in {root}; expected a CSV with columns "
                        f"{','.join(COLUMNS)}")
    try:
        with index.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{index} lacks column(s) {','.join(missing)}; expected columns "
                                f"{','.join(COLUMNS)}")
            records = list(reader)
    except (csv.Error, UnicodeDecodeError) as e:
        raise DataError(f"{index} is not a readable CSV ({e}); expected UTF-8 CSV with "
                        f"columns {','.join(COLUMNS)}") from e
    if not records:
        raise DataError(f"{index} has no rows; expected one row per video "
                        f"({','.join(COLUMNS)})")
    rows = []
    for rec in records:
        videoid = (rec["videoid"] or "").strip()
        page_dir = (rec["page_dir"] or "").strip()
        candidates = [root / f"{videoid}.mp4"] + ([root / page_dir / f"{videoid}.mp4"]
                                                   if page_dir else [])
        path = next((p for p in candidates if videoid and p.is_file()), None)
        rows.append(VideoRow(videoid, (rec["name"] or "").strip(), path))
    return rows


@dataclasses.dataclass(eq=False)
class WebVidConfig(tfds.core.BuilderConfig):
    """`storage`: "frames" (JPEG per frame at `size`), "bytes" (the video file as is) or
    "synthetic" (`num_videos` moving-shape clips of `num_frames` frames; no manual dir)."""

    storage: str = "frames"
    size: int = 256
    max_frames: int = 64
    num_videos: int = 64
    num_frames: int = 24
    seed: int = 0


def config_name(storage: str, size: int = 256, max_frames: int = 64, num_videos: int = 64,
                num_frames: int = 24, seed: int = 0) -> str:
    """The config name holds every setting that changes what is stored, so differently
    prepared variants live side by side under one data dir instead of being reused wrongly."""
    if storage == "frames":
        return f"frames_{size}px_{max_frames}f"
    if storage == "bytes":
        return "bytes"
    return f"synthetic_{size}px_{num_videos}x{num_frames}f_seed{seed}"


def make_config(storage: str = "frames", size: int = 256, **config: Any) -> WebVidConfig:
    """A validated config; the predefined object when the name matches one (tfds refuses a
    custom config that reuses a predefined name)."""
    if storage not in STORAGES:
        raise DataError(f"unknown storage {storage!r}; expected one of {', '.join(STORAGES)}")
    unknown = sorted(set(config) - set(_CONFIG_KEYS))
    if unknown:
        raise DataError(f"unknown config key(s) {', '.join(unknown)}; expected some of "
                        f"{', '.join(_CONFIG_KEYS)}")
    values = {k: int(v) for k, v in config.items()}
    if size < 8 or any(v < (0 if k == "seed" else 1) for k, v in values.items()):
        raise DataError(f"config size={size} {values}; expected size >= 8, counts >= 1, seed >= 0")
    name = config_name(storage, size, **values)
    predefined = WebVidFolder.builder_configs.get(name)
    if predefined is not None:
        return predefined
    return WebVidConfig(name=name, storage=storage, size=size, **values)


class WebVidFolder(tfds.core.GeneratorBasedBuilder):
    """Videos + captions from a local WebVid-layout folder, or synthetic moving shapes."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Frames (JPEG), raw bytes and synthetic configs.",
                     "1.1.0": "Synthetic clips carry their shapes' masks (`condition`, PNG)."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Pass a folder in the WebVid layout as the manual dir: results.csv with columns "
        "videoid,name,page_dir, and each video at {root}/{videoid}.mp4 or "
        "{root}/{page_dir}/{videoid}.mp4. Nothing is downloaded."
    )
    BUILDER_CONFIGS = [
        WebVidConfig(name=config_name("frames"), storage="frames"),
        WebVidConfig(name=config_name("bytes"), storage="bytes"),
        WebVidConfig(name=config_name("synthetic"), storage="synthetic"),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        features: dict[str, Any] = {"videoid": tfds.features.Text(),
                                    "caption": tfds.features.Text()}
        if cfg.storage == "bytes":
            # A scalar object Tensor round-trips arbitrary bytes (read back as `bytes`).
            features["video_bytes"] = tfds.features.Tensor(shape=(), dtype=np.object_)
        else:
            features["frames"] = tfds.features.Video(shape=(None, cfg.size, cfg.size, 3),
                                                     encoding_format="jpeg")
        if cfg.storage == "synthetic":  # control images for ControlNet training (lossless)
            features["condition"] = tfds.features.Video(shape=(None, cfg.size, cfg.size, 3),
                                                        encoding_format="png")
        # DatasetInfo(builder=self): dataset_info_from_configs needs a dataset package folder.
        return tfds.core.DatasetInfo(
            builder=self, description=self.__doc__,
            features=tfds.features.FeaturesDict(features),
            metadata=tfds.core.MetadataDict())

    @property
    def skipped(self) -> list[dict[str, str]]:
        """Videos left out when the dataset was prepared: [{"videoid", "reason"}, ...]."""
        return list(self.info.metadata.get("skipped", []))

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        if self.builder_config.storage == "synthetic":
            return {"train": self._generate_examples(None)}
        try:
            root = Path(dl_manager.manual_dir)
        except AssertionError as e:  # tfds's own multi-line "does not exist or is empty"
            raise DataError(f"manual dir {dl_manager._manual_dir} is missing or empty; expected "
                            "a WebVid-layout folder (results.csv + videos)") from e
        return {"train": self._generate_examples(root)}

    def _generate_examples(self, root: Path | None) -> Iterator[tuple[str, dict]]:
        cfg = self.builder_config
        self.info.metadata["skipped"] = []
        if root is None:
            for i in range(cfg.num_videos):
                video, caption, control = moving_shape(i, cfg.num_frames, cfg.size, cfg.seed,
                                                       condition=True)
                yield f"synthetic-{i:06d}", {"videoid": f"synthetic-{i:06d}",
                                             "caption": caption, "frames": video,
                                             "condition": control}
            self.info.metadata["stored"] = cfg.num_videos
            return
        rows, skipped, seen, stored = read_index(root), [], set(), 0
        for row in rows:
            try:
                if row.videoid in seen:
                    raise DataError("duplicate videoid; expected each videoid once")
                seen.add(row.videoid)
                if row.path is None:
                    raise DataError(f"no file at {root}/{row.videoid}.mp4 or "
                                    f"{root}/<page_dir>/{row.videoid}.mp4")
                example = self._example(row)
            except DataError as e:
                LOG.warning("skipped video %s: %s", row.videoid or "<empty videoid>", e)
                skipped.append({"videoid": row.videoid, "reason": str(e)})
                continue
            stored += 1
            yield row.videoid, example
        self.info.metadata["skipped"], self.info.metadata["stored"] = skipped, stored
        LOG.log(logging.WARNING if skipped else logging.INFO,
                "prepared %s from %s: %d videos stored, %d skipped (missing or unreadable)",
                cfg.name, root, stored, len(skipped))
        if stored == 0:
            raise DataError(f"none of the {len(rows)} videos listed in {root}/results.csv "
                            "could be used; expected readable mp4s at {root}/{videoid}.mp4 or "
                            "{root}/{page_dir}/{videoid}.mp4")

    def _example(self, row: VideoRow) -> dict:
        cfg = self.builder_config
        example: dict[str, Any] = {"videoid": row.videoid, "caption": row.caption}
        if cfg.storage == "bytes":
            # Stored as is: an undecodable file is only found (and replaced) at train time.
            try:
                example["video_bytes"] = row.path.read_bytes()
            except OSError as e:
                raise DataError(f"cannot read {row.path} ({e.strerror})") from e
        else:
            frames = decode_video(row.path, max_frames=cfg.max_frames)
            example["frames"] = resize_short_side_and_crop(frames, cfg.size)
        return example


def prepare(data_dir: str | Path, storage: str = "frames", *,
            manual_dir: str | Path | None = None, size: int = 256, overwrite: bool = False,
            **config: Any) -> WebVidFolder:
    """Build the dataset under `data_dir` as ArrayRecord, offline; reuses a finished one unless
    `overwrite`. `manual_dir` (the WebVid folder) is required except for "synthetic"."""
    cfg = make_config(storage, size, **config)
    if storage != "synthetic":
        if manual_dir is None:
            raise DataError(f"storage {storage!r} reads a local folder; expected manual_dir "
                            "(--manual-dir) pointing at a WebVid-layout folder")
        rows = read_index(manual_dir)  # fails early, before tfds, on a bad folder or CSV
        if not any(r.path is not None for r in rows):
            raise DataError(f"none of the {len(rows)} videos in {Path(manual_dir)}/results.csv "
                            "exist; expected {root}/{videoid}.mp4 or "
                            "{root}/{page_dir}/{videoid}.mp4")
    builder = WebVidFolder(data_dir=str(data_dir), config=cfg)
    mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    download_config = tfds.download.DownloadConfig(
        manual_dir=None if manual_dir is None else str(manual_dir),
        download_mode=mode, try_download_gcs=False)
    builder.download_and_prepare(download_config=download_config, file_format="array_record")
    return builder


def open_source(data_dir: str | Path, storage: str = "frames", size: int = 256,
                **config: Any) -> Any:
    """The prepared "train" split as a random-access source (`len`, `source[i]` -> dict)."""
    builder = WebVidFolder(data_dir=str(data_dir), config=make_config(storage, size, **config))
    if not builder.is_prepared():
        hint = PREPARE_HINT.format(data_dir=data_dir, s=storage)
        raise DataError(f"no prepared dataset at {builder.data_dir}; run `{hint}` first")
    source = builder.as_data_source("train")
    if len(source) == 0:
        raise DataError(f"the dataset at {builder.data_dir} has 0 rows; expected at least one "
                        "video (prepare it again from a folder with readable videos)")
    return source
