"""Pose keypoint parsing, the ControlNet skeleton renderer, pose loading and the demo."""

import json

import numpy as np
import pytest

from freeanimate_jax.io.images import letterbox
from freeanimate_jax.io.video import write_video
from freeanimate_jax.pose import (
    PoseError,
    demo_keypoints,
    demo_reference,
    load_poses,
    read_keypoints,
    render_pose,
    render_sequence,
)
from freeanimate_jax.pose.keypoints import KEYPOINT_NAMES
from freeanimate_jax.pose.render import COLORS, LIMBS, limb_color

# Written out from controlnet_aux 0.0.10, controlnet_aux/open_pose/util.py, draw_bodypose():
# its 1-based `limbSeq` and its `colors` (RGB). dwpose/util.py draw_bodypose has the same colours
# and the same first 17 pairs (it lists 19 and loops over range(17)).
REF_LIMB_SEQ = [
    [2, 3], [2, 6], [3, 4], [4, 5], [6, 7], [7, 8], [2, 9], [9, 10], [10, 11], [2, 12],
    [12, 13], [13, 14], [2, 1], [1, 15], [15, 17], [1, 16], [16, 18],
]  # fmt: skip
REF_COLORS = [
    [255, 0, 0], [255, 85, 0], [255, 170, 0], [255, 255, 0], [170, 255, 0], [85, 255, 0],
    [0, 255, 0], [0, 255, 85], [0, 255, 170], [0, 255, 255], [0, 170, 255], [0, 85, 255],
    [0, 0, 255], [85, 0, 255], [170, 0, 255], [255, 0, 255], [255, 0, 170], [255, 0, 85],
]  # fmt: skip
NECK, R_SHOULDER, R_ELBOW = 1, 2, 3


def _kp(points: dict[int, tuple[float, float, float]]) -> np.ndarray:
    kp = np.zeros((18, 3))
    for k, v in points.items():
        kp[k] = v
    return kp


def _frame(*people, canvas=(512, 256)):
    frame = {
        "people": [{"pose_keypoints_2d": np.asarray(p, float).ravel().tolist()} for p in people]
    }
    if canvas is not None:
        frame["canvas_height"], frame["canvas_width"] = canvas
    return frame


def _one_line_naming(err: pytest.ExceptionInfo, name: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg and name in msg, msg


# ---- renderer ------------------------------------------------------------------------------


def test_tables_match_controlnet_aux_source():
    assert [[a + 1, b + 1] for a, b in LIMBS] == REF_LIMB_SEQ
    assert [list(c) for c in COLORS] == REF_COLORS
    assert len(KEYPOINT_NAMES) == 18


def test_one_limb_pixels():
    kp = _kp({NECK: (50, 40, 1.0), R_SHOULDER: (20, 40, 0.9), R_ELBOW: (20, 70, 0.2)})
    img = render_pose(kp, (80, 100))
    assert img.shape == (80, 100, 3) and img.dtype == np.uint8
    assert limb_color(0) == (153, 0, 0)  # int(255 * 0.6): the reference's 0.6 opacity
    assert tuple(img[40, 35]) == (153, 0, 0)  # limb middle
    assert tuple(img[40 + 4, 35]) == (153, 0, 0) and not img[40 + 6, 35].any()  # stickwidth 4
    assert tuple(img[40, 50]) == COLORS[NECK]  # joint centres
    assert tuple(img[40, 20]) == COLORS[R_SHOULDER]
    assert not img[0, 0].any() and not img[79, 99].any()  # black background
    assert not img[55:, :].any()  # the 0.2-confidence elbow and its limb are not drawn
    colours = {tuple(c) for c in img.reshape(-1, 3)}
    assert colours == {(0, 0, 0), (153, 0, 0), COLORS[NECK], COLORS[R_SHOULDER]}


def test_missing_positions_not_drawn():
    kp = _kp({NECK: (0, 0, 1.0), R_SHOULDER: (-5, 10, 1.0), R_ELBOW: (np.nan, 3, 1.0)})
    assert not render_pose(kp, (32, 32)).any()


def test_multiple_people_and_sequence():
    a = _kp({NECK: (10, 10, 1), R_SHOULDER: (10, 30, 1)})
    b = _kp({NECK: (50, 10, 1), R_SHOULDER: (50, 30, 1)})
    img = render_pose(np.stack([a, b]), (40, 64))
    assert tuple(img[10, 10]) == COLORS[NECK] and tuple(img[10, 50]) == COLORS[NECK]
    seq = render_sequence(np.stack([a, b]), (40, 64))
    assert seq.shape == (2, 40, 64, 3) and tuple(seq[1, 10, 50]) == COLORS[NECK]


def test_pixel_exact_against_controlnet_aux():
    util = pytest.importorskip("controlnet_aux.open_pose.util")
    from controlnet_aux.open_pose.body import Keypoint

    rng = np.random.default_rng(0)
    for h, w in [(512, 512), (333, 517), (768, 512)]:
        norm = rng.uniform(-0.05, 1.0, (2, 18, 2))
        conf = rng.uniform(0.0, 1.0, (2, 18))
        ref = np.zeros((h, w, 3), np.uint8)
        for p in range(2):
            kps = [
                Keypoint(float(x), float(y)) if c > 0.3 and x >= 0 and y >= 0 else None
                for (x, y), c in zip(norm[p], conf[p], strict=True)
            ]
            ref = util.draw_bodypose(ref, kps)
        ours = np.concatenate([norm * [float(w), float(h)], conf[..., None]], axis=-1)
        np.testing.assert_array_equal(render_pose(ours, (h, w)), ref)


# ---- keypoint JSON -------------------------------------------------------------------------


def test_folder_natural_order(tmp_path):
    for i in (1, 2, 10):
        (tmp_path / f"f{i}.json").write_text(json.dumps(_frame(_kp({NECK: (i, 5, 1)}))))
    seq = read_keypoints(tmp_path)
    assert seq.keypoints.shape == (3, 1, 18, 3) and seq.canvas_hw == (512, 256)
    assert seq.person(0)[:, NECK, 0].tolist() == [1, 2, 10]


def test_list_file_confidences_and_single_frame(tmp_path):
    kp = _kp({NECK: (100, 200, 0.31), R_SHOULDER: (80, 200, 0.2), R_ELBOW: (0, 0, 0.9)})
    path = tmp_path / "poses.json"
    path.write_text(json.dumps([_frame(kp), _frame(kp)]))
    seq = read_keypoints(path)
    assert len(seq) == 2
    np.testing.assert_array_equal(seq.keypoints[0, 0, NECK], [100, 200, 0.31])
    assert not seq.keypoints[0, 0, R_SHOULDER].any() and not seq.keypoints[0, 0, R_ELBOW].any()
    path.write_text(json.dumps(_frame(kp)))
    assert len(read_keypoints(path)) == 1


def test_normalised_coordinates(tmp_path):
    path = tmp_path / "norm.json"
    path.write_text(json.dumps([_frame(_kp({NECK: (0.5, 0.25, 1), R_SHOULDER: (0.3, 1.0, 1)}))]))
    kp = read_keypoints(path).keypoints[0, 0]
    assert kp[NECK, :2].tolist() == [0.5 * 256.0, 0.25 * 512.0]
    assert kp[R_SHOULDER, :2].tolist() == [0.3 * 256.0, 512.0]
    path.write_text(json.dumps([_frame(_kp({NECK: (0.5, 0.5, 1)}), canvas=None)]))
    assert read_keypoints(path, canvas_hw=(100, 60)).keypoints[0, 0, NECK, :2].tolist() == [
        30.0,
        50.0,
    ]
    with pytest.raises(PoseError, match="canvas_hw") as err:
        read_keypoints(path)
    _one_line_naming(err, "norm.json")


def test_multiple_people_padded(tmp_path):
    a, b = _kp({NECK: (10, 10, 1)}), _kp({NECK: (20, 10, 1)})
    path = tmp_path / "p.json"
    path.write_text(json.dumps([_frame(a, b), _frame(a), {"people": []}]))
    kp = read_keypoints(path).keypoints
    assert kp.shape == (3, 2, 18, 3)
    assert kp[0, 1, NECK, 0] == 20 and not kp[1, 1].any() and not kp[2].any()


def test_body25_converted(tmp_path):
    body25 = np.zeros((25, 3))
    body25[:, 0] = np.arange(25) + 1  # x = BODY_25 index + 1
    body25[:, 1:] = 1.0
    body25[:, 1] = 5.0
    path = tmp_path / "b25.json"
    path.write_text(json.dumps(_frame(body25)))
    xs = read_keypoints(path).keypoints[0, 0, :, 0] - 1
    assert xs.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]


@pytest.mark.parametrize(
    "content, needle",
    [
        ("{not json", "malformed JSON"),
        (json.dumps([{"canvas_width": 10}]), "'people'"),
        (json.dumps([_frame(np.zeros(51))]), "expected 54"),
        (json.dumps([{"people": [{"pose_keypoints_2d": ["a", "b", "c"]}]}]), "numbers"),
        (json.dumps("hello"), "top level"),
        (json.dumps([]), "no frames"),
        (json.dumps([_frame(_kp({}))]), "no keypoint above"),
        (json.dumps([_frame(_kp({NECK: (5, 5, 1)}), canvas=None)]), "canvas_hw"),
        (json.dumps([_frame(_kp({NECK: (5, 5, 1)})), _frame(_kp({}), canvas=(9, 9))]), "disagree"),
    ],
)
def test_json_errors(tmp_path, content, needle):
    path = tmp_path / "bad_pose.json"
    path.write_text(content)
    with pytest.raises(PoseError, match=needle) as err:
        read_keypoints(path)
    _one_line_naming(err, "bad_pose.json")


def test_folder_error_names_frame_file(tmp_path):
    (tmp_path / "0001.json").write_text(json.dumps(_frame(_kp({NECK: (5, 5, 1)}))))
    (tmp_path / "0002.json").write_text(json.dumps({"peeple": []}))
    with pytest.raises(PoseError) as err:
        read_keypoints(tmp_path)
    _one_line_naming(err, "0002.json")
    assert isinstance(err.value, ValueError)


# ---- load_poses ----------------------------------------------------------------------------


def test_load_poses_from_json_letterboxes(tmp_path):
    kp = demo_keypoints(3, (512, 256))
    path = tmp_path / "demo.json"
    path.write_text(json.dumps([_frame(f) for f in kp]))
    out = load_poses(path, (64, 64))
    assert out.shape == (3, 64, 64, 3) and out.dtype == np.uint8
    assert not out[:, :, :16].any() and not out[:, :, 48:].any()  # pillarbox bars
    expected = letterbox(render_pose(kp[0], (512, 256)), (64, 64), kind="pose")[0]
    np.testing.assert_array_equal(out[0], expected)


def test_load_poses_images_and_video(tmp_path):
    frames = render_sequence(demo_keypoints(4, (64, 96)), (64, 96))
    folder = tmp_path / "skeletons"
    folder.mkdir()
    from PIL import Image

    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"pose_{i}.png")
    out = load_poses(folder, (32, 48))
    assert out.shape == (4, 32, 48, 3)
    np.testing.assert_array_equal(
        out, np.stack([letterbox(f, (32, 48), "pose")[0] for f in frames])
    )
    assert load_poses(folder / "pose_0.png", (32, 48)).shape == (1, 32, 48, 3)
    write_video(tmp_path / "poses.mp4", frames, fps=8)
    assert load_poses(tmp_path / "poses.mp4", (64, 64)).shape == (4, 64, 64, 3)


def test_load_poses_errors(tmp_path):
    with pytest.raises(PoseError) as err:
        load_poses(tmp_path / "nope", (64, 64))
    _one_line_naming(err, "nope")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(PoseError, match="empty") as err:
        load_poses(empty, (64, 64))
    _one_line_naming(err, "empty_dir")
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x01 definitely not a video" * 40)
    with pytest.raises(PoseError, match="corrupt") as err:
        load_poses(bad, (64, 64))
    _one_line_naming(err, "broken.mp4")
    img = tmp_path / "broken.png"
    img.write_bytes(b"nope")
    with pytest.raises(PoseError) as err:
        load_poses(img, (64, 64))
    _one_line_naming(err, "broken.png")


# ---- demo ----------------------------------------------------------------------------------


def test_demo_keypoints_motion():
    kp = demo_keypoints()
    assert kp.shape == (16, 18, 3) and np.all(kp[..., 2] == 1.0)
    np.testing.assert_array_equal(kp, demo_keypoints())
    wrist = kp[:, KEYPOINT_NAMES.index("r_wrist"), :2]
    hips = kp[:, [KEYPOINT_NAMES.index("r_hip"), KEYPOINT_NAMES.index("l_hip")], 0]
    assert np.ptp(wrist[:, 0]) > 30 and np.ptp(wrist[:, 1]) > 5  # waves
    assert np.ptp(hips.mean(1)) > 30  # steps side to side
    for hw in [(512, 512), (512, 320), (256, 640)]:
        k = demo_keypoints(16, hw)
        assert np.all(k[..., 0] > 0) and np.all(k[..., 0] < hw[1])
        assert np.all(k[..., 1] > 0) and np.all(k[..., 1] < hw[0])
    steps = np.linalg.norm(np.diff(np.concatenate([kp, kp[:1]])[..., :2], axis=0), axis=-1)
    assert steps.max() < 0.1 * 512  # smooth, and it loops


def test_demo_reference():
    ref = demo_reference()
    assert ref.shape == (64, 64, 3) and ref.dtype == np.uint8
    np.testing.assert_array_equal(ref, demo_reference())
    assert ref[0, 0].min() > 200  # light background
    kp = demo_keypoints(1, (64, 64))[0]
    torso = (
        kp[
            [
                KEYPOINT_NAMES.index("neck"),
                KEYPOINT_NAMES.index("r_hip"),
                KEYPOINT_NAMES.index("l_hip"),
            ],
            :2,
        ]
        .mean(0)
        .astype(int)
    )
    r, g, b = ref[torso[1], torso[0]].astype(int)
    assert r > 150 and g < 100 and b < 100  # red torso where the pose's torso is
    assert len({tuple(c) for c in ref.reshape(-1, 3)}) > 4
    assert demo_reference((48, 80)).shape == (48, 80, 3)
