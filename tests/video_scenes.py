"""The videos of the video tests: the tracking scenario (a disc partly hidden by a square passing in
front, a triangle entering after the first key frame, a star leaving), a lossless video writer, a
tiny transformers video model's config."""

from __future__ import annotations

import subprocess

import numpy as np
from tiny_models import tiny_meta_sam2_config

from ntt_core.synthetic import MovingShape
from ntt_core.tracking import TrackingSettings

WIDTH = 128  # a multiple of SAM2's 64 memory channels (Meta splits object pointers into 64-channel pieces)
SIDE = 128  # the tiny video model's frame

CLASSES = ("disc", "square", "triangle", "star")
DISC, SQUARE, TRIANGLE, STAR = range(4)  # object indices in the video
OBJECTS = [
    MovingShape("disc", start=(30, 40), velocity=(1.0, 0.0), radius=12),
    MovingShape("square", start=(115, 58), velocity=(-2.5, 0.0), radius=13),  # over the disc's lower part
    MovingShape("triangle", start=(-12, 82), velocity=(2.5, 0.0), radius=9, first=12),  # enters at the left
    MovingShape("star", start=(100, 20), velocity=(3.0, 0.0), radius=10),  # leaves on the right
]
FRAMES = 31
TRACKING = TrackingSettings(key_frame_stride=10, match_iou=0.5, lost_frames=4)


def write_video(frames, path, web: bool = False) -> str:
    """Frames -> a lossless video file (FFV1 in Matroska: decoded back exactly), or with ``web`` one a
    browser plays (VP9 in WebM, lossy: for the App's video player)."""
    height, width = frames[0].shape[:2]
    command = ["ffmpeg", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}"]
    codec = ["libvpx-vp9", "-pix_fmt", "yuv420p", "-b:v", "0", "-crf", "20"] if web else ["ffv1", "-pix_fmt", "bgr0"]
    command += ["-r", "10", "-i", "-", "-c:v", *codec, str(path)]
    subprocess.run(command, input=np.stack(frames).tobytes(), check=True)
    return str(path)


def tiny_video_config():
    """A tiny transformers Sam2VideoConfig (the tiny Meta-sized image part and small memory modules)."""
    from transformers import Sam2VideoConfig

    image = tiny_meta_sam2_config(WIDTH)
    return Sam2VideoConfig(
        vision_config=image.vision_config.to_dict(),
        prompt_encoder_config=image.prompt_encoder_config.to_dict(),
        mask_decoder_config=image.mask_decoder_config.to_dict(),
        image_size=SIDE,
        memory_attention_hidden_size=WIDTH,
        memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=64,
        memory_attention_rope_feat_sizes=[SIDE // 16] * 2,
        memory_encoder_hidden_size=WIDTH,
        mask_downsampler_embed_dim=WIDTH,
        memory_fuser_num_layers=1,
        memory_fuser_embed_dim=WIDTH,
        memory_fuser_intermediate_dim=64,
    )
