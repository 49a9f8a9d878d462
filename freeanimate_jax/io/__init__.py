"""Image and video input/output: loading, letterboxing, atomic writers, contact sheets."""

from freeanimate_jax.io.images import InputError, crop_box, letterbox, load_image
from freeanimate_jax.io.sheet import contact_sheet
from freeanimate_jax.io.video import read_video, write_json_atomic, write_png_atomic, write_video

__all__ = [
    "InputError",
    "contact_sheet",
    "crop_box",
    "letterbox",
    "load_image",
    "read_video",
    "write_json_atomic",
    "write_png_atomic",
    "write_video",
]
