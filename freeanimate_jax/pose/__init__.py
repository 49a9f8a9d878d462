"""Driving poses: OpenPose-18 keypoint JSON, the ControlNet skeleton renderer, sequence loading
and a procedural demo."""

from freeanimate_jax.pose.demo import demo_keypoints, demo_reference
from freeanimate_jax.pose.keypoints import PoseError, PoseSequence, read_keypoints
from freeanimate_jax.pose.render import render_pose, render_sequence
from freeanimate_jax.pose.sequence import load_poses

__all__ = [
    "PoseError",
    "PoseSequence",
    "demo_keypoints",
    "demo_reference",
    "load_poses",
    "read_keypoints",
    "render_pose",
    "render_sequence",
]
