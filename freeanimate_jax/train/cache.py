"""The latent cache: every clip encoded once, so real runs keep the VAE and the text encoder
out of the step.

One record per video: the VAE posterior's mean and log-std for every stored frame (at the
training size, unflipped), the caption's CLIP embedding, the caption and videoid; plus, once,
the empty prompt's embedding (for caption dropout). Records go to ArrayRecord shards of
`SHARD` videos, each written under a temporary name and renamed when complete, so an
interrupted `freeanimate train cache` resumes at the first missing shard. Training draws a
fresh posterior sample per step from (mean, std), as encoding on the fly does.

Flip: a mirrored latent is only approximately the latent of the mirrored frames, so training
from the cache does not flip (`data.hflip` is ignored there).
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from freeanimate_jax.data.errors import DataError
from freeanimate_jax.data.pipeline import TrainData, clip_window
from freeanimate_jax.io.atomic import staged

LOG = logging.getLogger("freeanimate_jax.train")
SHARD = 64
META = "latents.json"
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def _bits(v: np.ndarray) -> np.ndarray:
    """bf16 as its 16-bit pattern: .npy/.npz know no bfloat16 (np.save writes it as void)."""
    return v.view(np.uint16) if v.dtype == ml_dtypes.bfloat16 else v


def _unbits(v: np.ndarray) -> np.ndarray:
    # uint16 is only ever a stored bf16; 2-byte void is how older caches saved `empty`.
    return v.view(ml_dtypes.bfloat16) if v.dtype == np.uint16 or v.dtype.kind == "V" else v


def _pack(arrays: dict[str, np.ndarray], strings: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: _bits(v) for k, v in arrays.items()},
             **{f"str_{k}": np.asarray(v) for k, v in strings.items()})
    return buf.getvalue()


def _unpack(data: bytes) -> dict[str, Any]:
    with np.load(io.BytesIO(data)) as z:
        return {k[4:] if k.startswith("str_") else k:
                str(z[k]) if k.startswith("str_") else _unbits(z[k]) for k in z.files}


class LatentSource:
    """Random access to a latent cache folder (grain's ArrayRecord source)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser()
        meta = self.folder / META
        if not meta.is_file():
            raise DataError(f"{self.folder}: no latent cache ({META} missing); expected a "
                            f"folder written by `freeanimate train cache`")
        self.meta = json.loads(meta.read_text())
        if not self.meta["count"]:
            raise DataError(f"{self.folder}: the latent cache holds no clips; expected at "
                            f"least one")
        import grain

        paths = [str(self.folder / s) for s in self.meta["shards"]]
        self._source = grain.sources.ArrayRecordDataSource(paths)
        self.empty = _unbits(np.load(self.folder / "empty.npy"))

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return _unpack(self._source[int(index)])


class LatentData(TrainData):
    """TrainData's sampling (one global order reshuffled each epoch, windows by (seed, epoch,
    row)) over the latent cache: batches of `mean`, `logstd` (B, F, h, w, 4), `context`
    (B, 77, D) and the shared `empty` embedding."""

    def __init__(self, source: LatentSource, **kw: Any):
        kw["hflip"] = False
        super().__init__(source, **kw)

    def _load_batch(self, step: int, rows: np.ndarray) -> dict[str, np.ndarray]:
        epoch = step // self.steps_per_epoch
        recs, used = [], []
        for row in rows:
            rec = self.source[int(row)]
            idx = clip_window(self.seed, int(row), len(rec["mean"]), self.frames, self.stride,
                              epoch)
            recs.append({k: rec[k][idx] for k in ("mean", "logstd")} | {
                "context": rec["context"], "caption": rec.get("caption", "")})
            used.append(int(row))
        return {"mean": np.stack([r["mean"] for r in recs]),
                "logstd": np.stack([r["logstd"] for r in recs]),
                "context": np.stack([r["context"] for r in recs]),
                "empty": self.source.empty,
                "caption": np.array([r["caption"] for r in recs], dtype=object),
                "index": np.asarray(used, np.int64)}


def _encoder(vae: nnx.Module, text_encoder: nnx.Module):
    vg, vs = nnx.split(vae)
    tg, ts = nnx.split(text_encoder)

    @jax.jit
    def encode(vs, ts, pixels, ids):
        mean, logvar = nnx.merge(vg, vs).encode(pixels)
        return mean, 0.5 * logvar, nnx.merge(tg, ts)(ids)

    return lambda pixels, ids: encode(vs, ts, pixels, ids)


def _all_frames(record: dict, index: int, size: int, max_frames: int
                ) -> tuple[np.ndarray, str, str]:
    """Every stored frame (up to `max_frames`) of a row, unflipped, in [-1, 1]."""
    from freeanimate_jax.data.pipeline import decode_record
    from freeanimate_jax.data.video import decode_video

    if "frames" in record:
        count = min(len(record["frames"]), max_frames)
    else:
        count = len(decode_video(bytes(record["video_bytes"]), max_frames=max_frames))
    return decode_record(record, index=index, frames=count, stride=1, size=size, hflip=False,
                         max_frames=max_frames)


def write_cache(source: Any, out: str | Path, vae: nnx.Module, text_encoder: nnx.Module,
                tokenizer: Any, *, size: int, dtype: str = "bfloat16", max_frames: int = 64,
                log=print) -> dict[str, Any]:
    """Encode every row of a prepared dataset into `out`; resumes at the first missing
    shard. Returns the cache's metadata."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from freeanimate_jax.models.clip_text import tokenize

    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    n = len(source)
    if n == 0:
        raise DataError("the dataset has no rows; expected at least one prepared video")
    np_dtype = DTYPES[dtype]
    encode = _encoder(vae, text_encoder)
    shards = [f"latents-{i:05d}-of-{-(-n // SHARD):05d}.array_record"
              for i in range(-(-n // SHARD))]
    empty_ctx = np.asarray(encode(np.zeros((1, size, size, 3), np.float32),
                                  np.asarray(tokenize(tokenizer, [""])))[2][0])
    with staged(out / "empty.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, _bits(empty_ctx.astype(np_dtype)))
    for s, name in enumerate(shards):
        if (out / name).exists():
            log(f"shard {s + 1}/{len(shards)} already cached")
            continue
        tmp = out / f".{name}.tmp"
        writer = ArrayRecordWriter(str(tmp), "group_size:1")
        for i in range(s * SHARD, min(n, (s + 1) * SHARD)):
            pixels, caption, videoid = _all_frames(source[i], i, size, max_frames)
            mean, logstd, ctx = encode(pixels, np.asarray(tokenize(tokenizer, [caption])))
            writer.write(_pack({"mean": np.asarray(mean).astype(np_dtype),
                                "logstd": np.asarray(logstd).astype(np_dtype),
                                "context": np.asarray(ctx)[0].astype(np_dtype)},
                               {"caption": caption, "videoid": videoid}))
        writer.close()
        os.replace(tmp, out / name)
        log(f"shard {s + 1}/{len(shards)} cached ({min(n, (s + 1) * SHARD)}/{n} clips)")
    meta = {"count": n, "shards": shards, "dtype": dtype, "size": size,
            "scaling_factor": float(getattr(vae, "scaling_factor", 0.18215))}
    with staged(out / META) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    return meta

