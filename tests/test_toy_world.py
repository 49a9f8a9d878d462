"""The toy world: deterministic frames, captions that name what is drawn, held-out splits that
training never sees, skeletons drawn exactly as real keypoint files are."""

import json

import numpy as np
import pytest

from freeanimate_jax.pose import load_poses
from freeanimate_jax.pose.keypoints import KEYPOINT_NAMES
from freeanimate_jax.toy import data, motions, world

SIZE = (64, 64)


def _case(i=0, split="train", frames=6):
    return data.case(split, 0, i, frames, 64)


def _interior(m):
    """Pixels whose 3x3 neighbourhood is all in the mask."""
    p = np.pad(m, 1)
    return np.all([p[1 + dy:p.shape[0] - 1 + dy, 1 + dx:p.shape[1] - 1 + dx]
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)


def test_rendering_is_a_pure_function_of_the_case():
    a, b = _case(3), _case(3)
    assert a == b
    assert np.array_equal(a.video(), b.video())
    assert np.array_equal(a.parts(), b.parts())
    assert not np.array_equal(a.video(), _case(4).video())


def test_the_drawn_colours_are_the_appearance_and_the_caption_names_them():
    for i in range(12):
        c = _case(i, frames=2)
        app, video, parts = c.appearance, c.video(), c.parts()
        colors = app.colors()
        # A part's interior pixels have exactly its vocabulary colour (edges are box-averaged,
        # interiors flat), all but the few a gap thinner than a pixel crosses (an arm held a
        # hair's breadth from the body: the part map, sampled at pixel centres, misses it).
        for label in (world.BACKGROUND, world.SHIRT, world.TROUSER, world.SKIN):
            inner = _interior(parts[0] == label)
            assert inner.any(), (i, world.PARTS[label])
            exact = np.all(video[0][inner] == colors[label], axis=-1)
            assert exact.mean() > 0.97 and exact.sum() >= exact.size - 3, world.PARTS[label]
        assert world.parse_caption(app.caption) == (app.shirt, app.trousers, app.background)


def test_captions_fit_a_byte_level_clip_context():
    from freeanimate_jax.demo import tiny_tokenizer

    tok = tiny_tokenizer()
    longest = max(world.all_appearances(), key=lambda a: len(a.caption))
    ids = tok(longest.caption)["input_ids"]
    assert len(ids) <= 77 and ids[-1] == tok.eos_token_id
    assert all(b not in a.shirt for a in world.all_appearances() for b in ("_", "-"))


def test_held_out_outfits_and_motion_never_appear_in_training_rows():
    train = [_case(i, "train", 2) for i in range(300)]
    held = [_case(i, "held_out", 2) for i in range(60)]
    assert not any(c.appearance.held_out for c in train)
    assert not any(c.motion == motions.HELD_OUT_MOTION for c in train)
    assert all(c.appearance.held_out for c in held)
    assert {c.motion for c in held} >= {motions.HELD_OUT_MOTION}
    # Every background differs from the clothes: the figure is always visible.
    assert all(c.appearance.background not in (c.appearance.shirt, c.appearance.trousers)
               for c in train + held)


def test_bones_keep_their_length_through_every_motion():
    for motion in motions.MOTIONS:
        kp = motions.clip(motion, 16, seed=1)
        names = KEYPOINT_NAMES
        for a, b in (("r_shoulder", "r_elbow"), ("l_hip", "l_knee"), ("r_knee", "r_ankle")):
            i, j = names.index(a), names.index(b)
            lengths = np.linalg.norm(kp[:, i, :2] - kp[:, j, :2], axis=-1)
            assert np.ptp(lengths) < 1e-9, (motion, a, b)
        assert np.ptp(kp[..., :2], axis=0).max() > 0.01, f"{motion} does not move"
        assert kp[..., :2].min() > 0 and kp[..., :2].max() < 1, f"{motion} leaves the canvas"


def test_skeletons_are_what_a_keypoint_json_of_the_same_pose_loads_as(tmp_path):
    c = _case(5, frames=3)
    units = c.keypoints_units()
    canvas = world.POSE_CANVAS
    pix = world.to_pixels(units, (canvas, canvas))
    frames = [{"people": [{"pose_keypoints_2d": k.reshape(-1).tolist()}],
               "canvas_width": canvas, "canvas_height": canvas} for k in pix]
    path = tmp_path / "poses.json"
    path.write_text(json.dumps(frames))
    assert np.array_equal(c.poses(), load_poses(path, SIZE))


def test_the_source_rows_and_a_bad_request():
    src = data.ToySource(num_videos=3, num_frames=4, size=64)
    row = src[1]
    assert row["frames"].shape == (4, 64, 64, 3) and row["condition"].shape == (4, 64, 64, 3)
    assert row["caption"] == data.case("train", 0, 1, 4, 64).appearance.caption
    assert src[1] is row  # rendered once
    with pytest.raises(IndexError):
        src[3]
    with pytest.raises(ValueError, match="expected one of"):
        world.Appearance("mauve", "blue", "tan", "black", "grey")


def test_the_tfds_configs_write_and_read_back(tmp_path):
    builder = data.prepare(str(tmp_path), "image_pose", num_videos=8)
    assert builder.info.splits["train"].num_examples == 8
    assert builder.info.splits["held_out"].num_examples == 1
    src = data.open_prepared(str(tmp_path), 8, 1, 64, kind="image_pose")
    row = src[2]
    index = int(str(np.asarray(row["videoid"]).item(), "utf-8").rsplit("-", 1)[1]) \
        if isinstance(np.asarray(row["videoid"]).item(), bytes) \
        else int(str(row["videoid"]).rsplit("-", 1)[1])
    want = data.row(data.case("train", 0, index, 1, 64), "x")
    assert np.array_equal(np.asarray(row["frames"]), want["frames"])  # PNG: lossless
    assert np.array_equal(np.asarray(row["condition"]), want["condition"])


def test_the_demos_animate_a_held_out_figure_through_the_held_out_motion():
    from freeanimate_jax import config as cfg

    case = data.demo_case()
    assert case.appearance.held_out and case.motion == motions.HELD_OUT_MOTION
    assert cfg.DEMO_CONFIG["prompt"] == case.appearance.caption == cfg.DEMO_CAPTION
    assert cfg.DEMO_GENERATE_CONFIG["prompt"] == cfg.DEMO_CAPTION
    # The reference stands at rest where the clip's figure stands, in the case's colours.
    ref, first = case.reference(), case.video()[0]
    assert ref.shape == first.shape == (64, 64, 3)
    assert set(map(tuple, ref.reshape(-1, 3))) >= set(case.appearance.colors().values())
    figure = np.argwhere(np.any(ref != world.BACKGROUNDS[case.appearance.background], -1))
    moving = np.argwhere(np.any(first != world.BACKGROUNDS[case.appearance.background], -1))
    assert np.abs(figure.mean(0) - moving.mean(0)).max() < 4  # px: same place
    assert case.poses((64, 96)).shape == (16, 64, 96, 3)  # letterboxed like a JSON's canvas
