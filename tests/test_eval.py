"""The metrics on constructed cases with known answers, and `freeanimate eval` on a set."""

import json
import math

import numpy as np
import pytest
from skimage.color import rgb2lab

from freeanimate_jax.cli import main
from freeanimate_jax.eval import metrics
from freeanimate_jax.io.video import write_video
from freeanimate_jax.toy import data, world

BG, SHIRT, TROUSERS, SKIN = (150, 150, 150), (205, 40, 40), (40, 60, 140), (215, 165, 120)
COLORS = {world.BACKGROUND: BG, world.SHIRT: SHIRT, world.TROUSER: TROUSERS, world.SKIN: SKIN,
          world.HAIR: (20, 20, 20)}


def _figure(frames=4, x0=20, dx=0, h=48, w=64):
    """A blocky 'figure' (skin head, shirt, trousers: 8 px wide bands) moving dx px a frame."""
    parts = np.zeros((frames, h, w), np.uint8)
    for f in range(frames):
        x = x0 + f * dx
        parts[f, 6:14, x:x + 8] = world.SKIN
        parts[f, 14:28, x:x + 8] = world.SHIRT
        parts[f, 28:44, x:x + 8] = world.TROUSER
    video = np.zeros((*parts.shape, 3), np.uint8)
    for label, rgb in COLORS.items():
        video[parts == label] = rgb
    return video, parts


def test_identical_videos_score_perfectly():
    video, parts = _figure(dx=2)
    m = metrics.evaluate(video, video, parts, COLORS)
    assert m["l1"] == 0 and math.isinf(m["psnr"]) and m["ssim"] == pytest.approx(1.0)
    assert m["pose_iou"] == 1 and m["part_offset"] == 0
    assert m["identity"] == pytest.approx(0, abs=1e-9)  # Lab round trip: ~1e-13
    assert m["temporal_error"] == 0 and m["flicker_ratio"] == 1


def test_a_shifted_figure_loses_pose_by_its_overlap():
    video, parts = _figure()
    d = 3
    shifted, _ = _figure(x0=20 + d)
    m = metrics.evaluate(shifted, video, parts, COLORS)
    # Same-sized rectangles offset sideways by d: IoU = (w - d) / (w + d), w = 8.
    assert m["pose_iou"] == pytest.approx((8 - d) / (8 + d))
    assert m["part_offset"] == pytest.approx(d / 48)  # every part's centroid moved d px
    assert m["identity"] > 0  # the truth's part interiors now see background in part


def test_a_lost_part_costs_more_than_any_misplaced_one():
    video, parts = _figure(frames=1)
    lost = video.copy()
    lost[parts == world.SHIRT] = BG  # no shirt-coloured pixel left
    far, _ = _figure(frames=1, x0=56)  # the whole figure moved to the right edge
    shirt = np.argwhere(parts[0] == world.SHIRT).mean(axis=0)  # (20.5, 23.5) in a 48x64 frame
    corner = np.linalg.norm(shirt - (47, 63))  # the farthest corner: bottom right
    m_lost = metrics.part_offset(lost, parts, COLORS)
    # One of three parts lost (the others in place): a third of the farthest corner distance.
    assert m_lost == pytest.approx(corner / 48 / 3)
    assert m_lost > metrics.part_offset(far, parts, COLORS) / 3 > 0


def test_a_recoloured_shirt_costs_its_colour_difference():
    video, parts = _figure()
    recoloured = video.copy()
    blue = (40, 70, 230)
    recoloured[parts == world.SHIRT] = blue
    m = metrics.evaluate(recoloured, video, parts, COLORS)
    # CIE76: the Euclidean distance in Lab; one of the three parts changed.
    lab = rgb2lab(np.array([[SHIRT, blue]], np.float64) / 255)[0]
    assert m["identity"] == pytest.approx(np.linalg.norm(lab[0] - lab[1]) / 3, rel=1e-6)
    assert m["pose_iou"] == 1  # the figure is where it was
    assert m["temporal_error"] == 0


def test_a_flickering_video_shows_as_temporal_error():
    video, parts = _figure(frames=6, dx=1)
    c = 10  # grey levels, alternating up and down: never clipped (all values 20..230)
    sign = np.array([1, -1, 1, -1, 1, -1])[:, None, None, None]
    flicker = (video.astype(int) + c * sign).astype(np.uint8)
    m = metrics.evaluate(flicker, video, parts, COLORS)
    # Every frame difference gains +-2c on every pixel.
    assert m["temporal_error"] == pytest.approx(2 * c / 255)
    assert m["flicker_ratio"] > 2
    assert m["psnr"] == pytest.approx(10 * np.log10(255**2 / c**2))
    assert m["l1"] == pytest.approx(c / 255)


def test_eval_scores_a_two_video_set_and_writes_the_table(tmp_path):
    case = data.Case(world.Appearance("red", "blue", "tan", "black", "grey"), "wave", 4, 6,
                     64)
    truth = case.video()
    recoloured = truth.copy()
    recoloured[case.parts() == world.SHIRT] = world.SHIRTS["green"]
    write_video(tmp_path / "set" / "truth.npz", truth, 8)
    write_video(tmp_path / "set" / "green.npz", recoloured, 8)
    (tmp_path / "set" / "set.json").write_text(json.dumps({
        "rows": ["truth", "green shirt"],
        "cases": [{"name": "c0", "case": case.to_dict(),
                   "videos": {"truth": "truth.npz", "green shirt": "green.npz"}}]}))
    out = tmp_path / "out" / "table.md"
    assert main(["eval", str(tmp_path / "set"), "--out", str(out)]) == 0
    table = out.read_text()
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| method | n | L1")
    assert lines[1].startswith("| truth | 1 | 0.000 ± 0.000")
    assert lines[2].startswith("| green shirt | 1 |")
    result = json.loads(out.with_suffix(".json").read_text())
    green = next(v["metrics"] for v in result["per_video"] if v["row"] == "green shirt")
    lab = rgb2lab(np.array([[world.SHIRTS["red"], world.SHIRTS["green"]]], float) / 255)[0]
    assert green["identity"] == pytest.approx(np.linalg.norm(lab[0] - lab[1]) / 3, rel=0.05)
    assert green["pose_iou"] > 0.97  # edges blend with another colour; the body is in place
    truth_row = next(v["metrics"] for v in result["per_video"] if v["row"] == "truth")
    # The truth's own identity is a hair above 0: a few part interiors hold a gap thinner than
    # a pixel (see test_toy_world); far below a visible difference (Delta E ~2).
    assert truth_row["pose_iou"] == 1 and truth_row["identity"] < 0.2


def test_eval_refuses_a_set_naming_a_missing_video(tmp_path, capsys):
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "set.json").write_text(json.dumps({"cases": [{
        "name": "c0", "case": {}, "videos": {"x": "nope.npz"}}]}))
    out = tmp_path / "table.md"
    assert main(["eval", str(tmp_path / "set"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.npz" in err[0] and "expected" in err[0]
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_rows_differ_only_beyond_twice_their_spread_over_seeds(tmp_path):
    from freeanimate_jax.eval.table import differences, markdown, score_set

    case = data.Case(world.Appearance("red", "blue", "tan", "brown", "grey"), "wave", 4, 4, 64)
    truth = case.video()
    sign = np.array([1, -1, 1, -1])[:, None, None, None]  # every channel stays in 0..255

    def flicker(c):
        return (truth.astype(int) + c * sign).astype(np.uint8)

    # Per clip (one case here), two sampling seeds; temporal error = 2c/255 per video.
    rows = {"truth": (0, 0), "steady": (4, 8), "unsteady": (2, 18)}
    cases = []
    for seed in (0, 1):
        videos = {}
        for row, cs in rows.items():
            write_video(tmp_path / f"{row}{seed}.npz", flicker(cs[seed]), 8)
            videos[row] = f"{row}{seed}.npz"
        cases.append({"name": f"c-s{seed}", "case": case.to_dict(), "videos": videos})
    (tmp_path / "set.json").write_text(json.dumps({"rows": list(rows), "cases": cases}))
    result = score_set(tmp_path)
    te = "temporal_error"
    # The spread over seeds: the std of (2 * 4, 2 * 8) / 255 and of (2 * 2, 2 * 18) / 255.
    assert result["seed_spread"]["steady"][te] == pytest.approx(4 / 255)
    assert result["seed_spread"]["unsteady"][te] == pytest.approx(16 / 255)
    diff = differences(result, "truth")
    # steady: 12/255 worse, beyond 2 x 4/255; unsteady: 20/255 worse, within 2 x 16/255.
    assert diff["steady"][te]["delta"] == pytest.approx(12 / 255)
    assert diff["steady"][te]["verdict"] == "worse"
    assert diff["unsteady"][te]["verdict"] == "within spread"
    assert diff["truth"][te]["verdict"] == "within spread"
    text = markdown({**result, "baseline": "truth", "differences": diff})
    said = {line.split(":")[0]: line for line in text.splitlines() if line.startswith("- ")}
    assert set(said) == {"- steady", "- unsteady"} and "| steady | 2 |" in text
    assert "temporal err" in said["- steady"] and "temporal err" not in said["- unsteady"]
