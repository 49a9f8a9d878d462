"""Image loading, letterbox / crop-back, atomic video / PNG / JSON writers, contact sheets."""

import json

import numpy as np
import pytest
from PIL import Image

from freeanimate_jax.io import video as video_mod
from freeanimate_jax.io.images import InputError, crop_box, letterbox, load_image
from freeanimate_jax.io.sheet import LABEL_H, cell_origin, contact_sheet
from freeanimate_jax.io.video import (
    read_video,
    write_json_atomic,
    write_png_atomic,
    write_video,
)


def _gradient_frames(f: int, h: int, w: int) -> np.ndarray:
    """Smooth moving gradients: codecs and resizers reproduce them closely."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    return np.stack(
        [
            np.stack([(xx + 0.1 * i) % 1.0, yy, 0.5 + 0.3 * np.sin(3 * xx + i) * yy], axis=-1)
            for i in range(f)
        ]
    ).astype(np.float32)


def _assert_one_line_naming(err: pytest.ExceptionInfo, name: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg and name in msg, msg


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---- images --------------------------------------------------------------------------------


def test_load_image_alpha_and_modes(tmp_path):
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half fully transparent
    Image.fromarray(rgba).save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img.shape == (4, 5, 3) and img.dtype == np.uint8
    assert tuple(img[0, 0]) == (200, 0, 0) and tuple(img[3, 0]) == (255, 255, 255)
    Image.fromarray(np.full((3, 3), 77, np.uint8)).save(tmp_path / "g.jpg")
    assert load_image(tmp_path / "g.jpg").shape == (3, 3, 3)
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: stored sideways, display rotated 90 degrees
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / "phone.jpg", exif=exif)
    assert load_image(tmp_path / "phone.jpg").shape == (6, 4, 3)


def test_load_image_errors(tmp_path):
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(InputError) as err:
        load_image(tmp_path / "notes.png")
    _assert_one_line_naming(err, "notes.png")
    with pytest.raises(InputError) as err:
        load_image(tmp_path / "missing.png")
    _assert_one_line_naming(err, "missing.png")


@pytest.mark.parametrize(
    "src_hw, box",
    [((50, 100), (16, 0, 32, 64)), ((100, 50), (0, 16, 64, 32)), ((64, 64), (0, 0, 64, 64))],
)
def test_letterbox_crop_round_trip(src_hw, box):
    img = (_gradient_frames(1, *src_hw)[0] * 255).round().astype(np.uint8)
    out, got = letterbox(img, (64, 64))
    assert got == box and out.shape == (64, 64, 3)
    top, left, h, w = box
    mask = np.zeros((64, 64), bool)
    mask[top : top + h, left : left + w] = True
    assert not out[~mask].any()  # black bars outside the content box
    back = crop_box(out[None], box, src_hw)
    assert back.shape == (1, *src_hw, 3)
    assert np.abs(back[0].astype(int) - img).mean() < 4
    assert crop_box(out, box).shape == (h, w, 3)  # no resize: the model-scale crop


def test_letterbox_float_and_pose_kind():
    img = _gradient_frames(1, 30, 90)[0]
    out, box = letterbox(img, (48, 48), kind="pose")
    assert out.dtype == np.float32 and box == (16, 0, 16, 48)
    back = crop_box(out, box, (30, 90))
    assert back.dtype == np.float32 and np.abs(back - img).mean() < 0.03


# ---- video ---------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(64, 48), (40, 72)])
def test_mp4_round_trip(tmp_path, hw):
    frames = _gradient_frames(5, *hw)
    write_video(tmp_path / "out.mp4", frames, fps=8)
    got, fps = read_video(tmp_path / "out.mp4")
    assert got.shape == (5, *hw, 3) and got.dtype == np.uint8 and fps == pytest.approx(8)
    assert np.abs(got.astype(float) - frames * 255).mean() < 3
    assert _leftovers(tmp_path) == ["out.mp4"]


def test_mp4_odd_size_padded_to_even(tmp_path):
    frames = (_gradient_frames(3, 33, 47) * 255).round().astype(np.uint8)
    write_video(tmp_path / "odd.mp4", frames, fps=10)
    got, _ = read_video(tmp_path / "odd.mp4")
    assert got.shape == (3, 34, 48, 3)  # documented: yuv420p needs even sides
    assert np.abs(got[:, :33, :47].astype(int) - frames).mean() < 3


def test_gif_round_trip(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]
    frames = np.stack([np.full((20, 30, 3), c, np.uint8) for c in colours])
    write_video(tmp_path / "a.gif", frames, fps=10)
    got, fps = read_video(tmp_path / "a.gif")
    np.testing.assert_array_equal(got, frames)
    assert fps == pytest.approx(10)


def test_npz_exact_round_trip(tmp_path):
    frames = np.random.default_rng(0).random((4, 9, 7, 3), dtype=np.float32)
    write_video(tmp_path / "f.npz", frames, fps=12.5)
    with np.load(tmp_path / "f.npz") as z:
        np.testing.assert_array_equal(z["frames"], frames)
        assert z["frames"].dtype == np.float32 and float(z["fps"]) == 12.5
    got, fps = read_video(tmp_path / "f.npz")
    np.testing.assert_array_equal(got, np.round(frames * 255).astype(np.uint8))
    assert fps == 12.5


@pytest.mark.parametrize("name", ["nan.mp4", "nan.gif", "nan.npz"])
def test_nan_frames_leave_nothing(tmp_path, name):
    frames = _gradient_frames(2, 16, 16)
    frames[1, 3, 3, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        write_video(tmp_path / name, frames, fps=8)
    assert _leftovers(tmp_path) == []


def test_failure_mid_write_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "v.npz"
    target.write_bytes(b"previous result")

    def explode(tmp, frames, fps):
        tmp.write_bytes(b"half a video")
        raise RuntimeError("disk full")

    monkeypatch.setattr(video_mod, "_write_npz", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        write_video(target, _gradient_frames(2, 8, 8), fps=8)
    assert _leftovers(tmp_path) == ["v.npz"] and target.read_bytes() == b"previous result"


def test_corrupt_and_truncated_video(tmp_path):
    (tmp_path / "junk.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 garbage" * 20)
    with pytest.raises(InputError, match="corrupt") as err:
        read_video(tmp_path / "junk.mp4")
    _assert_one_line_naming(err, "junk.mp4")
    write_video(tmp_path / "good.mp4", _gradient_frames(6, 32, 32), fps=8)
    data = (tmp_path / "good.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as err:
        read_video(tmp_path / "cut.mp4")
    _assert_one_line_naming(err, "cut.mp4")
    (tmp_path / "junk.gif").write_bytes(b"GIF89a" + b"\x01" * 30)
    with pytest.raises(InputError) as err:
        read_video(tmp_path / "junk.gif")
    _assert_one_line_naming(err, "junk.gif")


def test_bad_arguments(tmp_path):
    with pytest.raises(InputError, match="suffix"):
        write_video(tmp_path / "x.avi", _gradient_frames(1, 8, 8), fps=8)
    with pytest.raises(InputError, match="shape"):
        write_video(tmp_path / "x.mp4", np.zeros((8, 8, 3)), fps=8)
    assert _leftovers(tmp_path) == []


def test_json_and_png_atomic(tmp_path):
    write_json_atomic(tmp_path / "meta.json", {"seed": 1, "name": "é"})
    assert json.loads((tmp_path / "meta.json").read_text(encoding="utf-8"))["name"] == "é"
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "bad.json", {"x": object()})
    img = (_gradient_frames(1, 10, 12)[0] * 255).round().astype(np.uint8)
    write_png_atomic(tmp_path / "sub" / "img.png", img)
    np.testing.assert_array_equal(load_image(tmp_path / "sub" / "img.png"), img)
    assert _leftovers(tmp_path) == ["meta.json", "sub"]


# ---- contact sheet -------------------------------------------------------------------------


def test_contact_sheet_layout():
    frames = (_gradient_frames(9, 20, 30) * 255).round().astype(np.uint8)
    ref = np.full((20, 30, 3), 200, np.uint8)
    sheet = contact_sheet({"reference": ref, "result": frames}, rows=3)
    assert sheet.shape == (LABEL_H + 2 + 3 * 20 + 2 * 2, 2 * 30 + 2, 3) and sheet.dtype == np.uint8
    for r, idx in enumerate([0, 4, 8]):  # evenly spaced over 9 frames
        y, x = cell_origin(r, 1, (20, 30))
        np.testing.assert_array_equal(sheet[y : y + 20, x : x + 30], frames[idx])
        y, x = cell_origin(r, 0, (20, 30))
        np.testing.assert_array_equal(sheet[y : y + 20, x : x + 30], ref)  # repeated
    label = sheet[:LABEL_H, :30]
    assert len({tuple(c) for c in label.reshape(-1, 3)}) > 1  # some text was drawn


def test_contact_sheet_mixed_sizes_and_floats():
    sheet = contact_sheet(
        {"pose": np.zeros((4, 10, 10, 3), np.float32), "preview": np.ones((2, 20, 40, 3))},
        rows=8,
    )
    # rows clamp to the longest column (4); cells take the largest frame size (20 x 40)
    assert sheet.shape == (LABEL_H + 2 + 4 * 20 + 3 * 2, 2 * 40 + 2, 3)
    y, x = cell_origin(3, 1, (20, 40))
    assert (sheet[y : y + 20, x : x + 40] == 255).all()
