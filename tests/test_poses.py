"""Poses from a driving video: `freeanimate poses` runs the real detector code path (rtmlib's
RTMPose on onnxruntime: crop, normalisation, SimCC decoding, the box back-transform) with an ONNX
model built here whose SimCC outputs encode known keypoints; COCO-17 -> OpenPose-18; smoothing;
retargeting keeps the reference's bone lengths within 1 px and the driving angles and root
motion."""

from __future__ import annotations

import numpy as np
import pytest

from freeanimate_jax import cli
from freeanimate_jax.io.video import write_video
from freeanimate_jax.pose import read_keypoints
from freeanimate_jax.pose.detect import BONES, coco_to_openpose, retarget, smooth

onnx = pytest.importorskip("onnx")
pytest.importorskip("rtmlib")
IN_W, IN_H = 48, 64  # the test model's crop (width, height)
# Known COCO-17 keypoints in the model's crop pixels (half-pixel grid: SimCC's split ratio 2).
CROP_KP = np.array([[24, 10], [22, 9], [26, 9], [20, 10], [28, 10], [18, 18], [30, 18],
                    [16, 26], [32, 26], [15, 33], [33, 33], [20, 36], [28, 36], [20, 46],
                    [28, 46], [20, 56], [28, 56.5]], np.float64)


def pose_onnx(path, in_wh: tuple[int, int] = (IN_W, IN_H)) -> None:
    """input (1, 3, H, W) -> simcc_x (1, 17, 2W), simcc_y (1, 17, 2H): one-hot at the known
    keypoints (plus 0 x the input's mean, so the graph reads its input)."""
    from onnx import TensorProto, helper, numpy_helper

    IN_W, IN_H = in_wh  # noqa: N806

    sx = np.full((1, 17, 2 * IN_W), 0.01, np.float32)
    sy = np.full((1, 17, 2 * IN_H), 0.01, np.float32)
    for k, (u, v) in enumerate(CROP_KP):
        sx[0, k, int(round(2 * u))] = 0.9
        sy[0, k, int(round(2 * v))] = 0.8
    nodes = [helper.make_node("ReduceMean", ["input"], ["m"], keepdims=0),
             helper.make_node("Mul", ["m", "zero"], ["z"]),
             helper.make_node("Add", ["cx", "z"], ["simcc_x"]),
             helper.make_node("Add", ["cy", "z"], ["simcc_y"])]
    graph = helper.make_graph(
        nodes, "simcc", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                       [1, 3, IN_H, IN_W])],
        [helper.make_tensor_value_info("simcc_x", TensorProto.FLOAT, [1, 17, 2 * IN_W]),
         helper.make_tensor_value_info("simcc_y", TensorProto.FLOAT, [1, 17, 2 * IN_H])],
        [numpy_helper.from_array(sx, "cx"), numpy_helper.from_array(sy, "cy"),
         numpy_helper.from_array(np.zeros((), np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _expected_image_kp(frame_hw: tuple[int, int]) -> np.ndarray:
    """RTMPose's top-down convention, written out: the whole-frame box padded 1.25x, widened
    or heightened to the crop's aspect, centred on the frame; crop pixels map linearly."""
    h, w = frame_hw
    sw, sh = 1.25 * w, 1.25 * h
    if sw > sh * IN_W / IN_H:
        sh = sw * IN_H / IN_W
    else:
        sw = sh * IN_W / IN_H
    return np.stack([CROP_KP[:, 0] / IN_W * sw + w / 2 - sw / 2,
                     CROP_KP[:, 1] / IN_H * sh + h / 2 - sh / 2], -1)


def test_poses_from_a_video_run_the_detector_and_write_openpose_json(tmp_path, capsys):
    model = tmp_path / "pose.onnx"
    pose_onnx(model)
    frames = np.random.default_rng(0).integers(0, 255, (4, 96, 64, 3), dtype=np.uint8)
    write_video(tmp_path / "dance.mp4", frames, 8.0)
    out = tmp_path / "poses"
    rc = cli.main(["poses", str(tmp_path / "dance.mp4"), "--out", str(out), "--pose-model",
                   str(model), "--det-model", "none", "--pose-input", f"{IN_W}x{IN_H}"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"frame_{i:05d}.json" for i in range(4)] + [f"skeleton_{i:05d}.png" for i in range(4)])
    seq = read_keypoints(out)  # the pose loader `--poses` uses reads them back
    assert seq.keypoints.shape == (4, 1, 18, 3) and seq.canvas_hw == (96, 64)
    want = coco_to_openpose(_expected_image_kp((96, 64)), np.full(17, 0.8))
    for t in range(4):
        np.testing.assert_allclose(seq.keypoints[t, 0, :, :2], want[:, :2], atol=1e-2)
    # The score is SimCC's, as rtmlib reads it: the mean of the x and y peaks (0.9, 0.8).
    np.testing.assert_allclose(seq.keypoints[:, 0, :, 2], 0.85, atol=1e-3)
    assert "4 frames, 18.0 of 18 keypoints seen" in captured.out


def test_bad_inputs_are_one_line_and_write_nothing(tmp_path, capsys):
    rc = cli.main(["poses", str(tmp_path / "nope.mp4"), "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "nope.mp4: no such file or folder" in err and "\n" not in err
    from PIL import Image

    frames = tmp_path / "frames"
    frames.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(frames / "f0.png")
    rc = cli.main(["poses", str(frames), "--out", str(tmp_path / "p"), "--pose-model",
                   str(tmp_path / "missing.onnx"), "--det-model", "none"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "pose model" in err and "no such file" in err, err
    (tmp_path / "page.onnx").write_text("<html>not a model</html>")
    rc = cli.main(["poses", str(frames), "--out", str(tmp_path / "p"), "--pose-model",
                   str(tmp_path / "page.onnx"), "--det-model", "none"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "could not be loaded" in err, err
    assert not (tmp_path / "p").exists()


def test_coco_to_openpose_puts_the_neck_between_the_shoulders():
    kp = np.arange(34, dtype=np.float64).reshape(17, 2)
    sc = np.linspace(0.5, 0.9, 17)
    op = coco_to_openpose(kp, sc)
    np.testing.assert_allclose(op[1, :2], (kp[5] + kp[6]) / 2)
    assert op[1, 2] == min(sc[5], sc[6])
    # OpenPose's right shoulder is COCO's 6, its left ear COCO's 3.
    np.testing.assert_array_equal(op[2, :2], kp[6])
    np.testing.assert_array_equal(op[17, :2], kp[3])
    np.testing.assert_array_equal(op[0, :2], kp[0])


def _pose(seed: int, scale: float, at: tuple[float, float]) -> np.ndarray:
    """A plausible OpenPose-18 body: a tree of bones with random angles."""
    rng = np.random.default_rng(seed)
    p = np.zeros((18, 3))
    p[1] = [*at, 0.9]
    for parent, child in BONES:
        angle = rng.uniform(0, 2 * np.pi)
        length = scale * rng.uniform(10, 30)
        p[child] = [p[parent, 0] + length * np.cos(angle), p[parent, 1] + length * np.sin(angle),
                    0.9]
    return p


def test_retargeting_keeps_the_references_bones_and_the_driving_motion():
    reference = _pose(0, 1.0, (50, 40))
    driving = np.stack([_pose(10 + t, 1.7, (200 + 5 * t, 120 - 2 * t)) for t in range(6)])
    out = retarget(driving, reference)
    for t in range(6):
        for parent, child in BONES:
            ref_len = np.linalg.norm(reference[child, :2] - reference[parent, :2])
            got = out[t, child, :2] - out[t, parent, :2]
            assert abs(np.linalg.norm(got) - ref_len) <= 1.0  # the reference's bone lengths
            drv = driving[t, child, :2] - driving[t, parent, :2]
            cos = got @ drv / (np.linalg.norm(got) * np.linalg.norm(drv))
            assert cos > 1 - 1e-9  # the driving pose's bone angles
    # The root starts at the reference's neck and moves as the driving neck, scaled.
    np.testing.assert_allclose(out[0, 1, :2], reference[1, :2])
    moves = np.diff(out[:, 1, :2], axis=0)
    drv_moves = np.diff(driving[:, 1, :2], axis=0)
    ratio = moves / drv_moves
    assert np.allclose(ratio, ratio[0, 0])
    # A keypoint the driving pose misses stays missing, with everything below it.
    driving[2, 3, 2] = 0.0
    out = retarget(driving, reference)
    assert out[2, 3, 2] == 0 and out[2, 4, 2] == 0 and out[2, 6, 2] > 0.3


def test_smoothing_averages_seen_points_and_keeps_missing_ones():
    track = np.zeros((5, 18, 3))
    track[..., 2] = 0.9
    track[:, 0, 0] = [0, 10, 0, 10, 0]  # jitter
    track[2, 5, 2] = 0.0  # missing in one frame
    out = smooth(track, 3)
    np.testing.assert_allclose(out[1:4, 0, 0], [10 / 3, 20 / 3, 10 / 3])
    assert out[2, 5, 2] == 0.0 and out[2, 5, 0] == 0.0


def test_detected_pose_frames_are_letterboxed_skeletons(tmp_path):
    """`animate --poses VIDEO --detect`'s path: detect, retarget to the reference, render at
    the video's size, letterbox to the model size."""
    from freeanimate_jax.pose.detect import detected_pose_frames

    model = tmp_path / "pose.onnx"
    pose_onnx(model)
    frames = np.random.default_rng(1).integers(0, 255, (3, 96, 64, 3), dtype=np.uint8)
    write_video(tmp_path / "drive.mp4", frames, 8.0)
    reference = np.full((128, 64, 3), 128, np.uint8)  # taller than the video: its canvas
    out = detected_pose_frames(str(tmp_path / "drive.mp4"), (128, 128), reference=reference,
                               pose_model=str(model), det_model=None, pose_input=(IN_W, IN_H))
    assert out.shape == (3, 128, 128, 3) and out.dtype == np.uint8
    # Drawn on the reference's 128x64 canvas (the retargeted poses are in its pixels), then
    # letterboxed into 128x128: 32-pixel side bars (the video's 96x64 would leave 21).
    assert (out[:, :, :32] == 0).all() and (out[:, :, -32:] == 0).all()
    assert out[:, :, 32:96].max() > 100
    assert (out.reshape(3, -1).max(1) > 100).all()  # limbs drawn in every frame
