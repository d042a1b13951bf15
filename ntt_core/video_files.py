"""Reading videos as streams of frames: video files through ffmpeg, frame folders image by image.
Frames come one at a time, as ``[H, W, 3]`` uint8 RGB, so a long video is never decoded at once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .coco import IMAGE_EXTENSIONS, list_images
from .images import ImageError, load_image
from .tracking import VideoError

#: Files read as videos (through ffmpeg); folders of images are read as frame folders.
VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


def list_videos(folder: str | Path) -> list[Path]:
    """The videos of ``folder``, sorted: video files, and sub-folders holding images (frame folders)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VideoError(f"{folder}: video folder not found")
    videos = [
        path
        for path in sorted(folder.iterdir())
        if (path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS)
        or (path.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir()))
    ]
    if not videos:
        raise VideoError(
            f"{folder}: no videos ({', '.join(VIDEO_EXTENSIONS)}) and no frame folders (sub-folders of images)"
        )
    return videos


def read_frames(path: str | Path) -> Iterator[np.ndarray]:
    """The frames of a video file (through ffmpeg) or of a frame folder (its images in sorted order),
    one at a time; :class:`~ntt_core.tracking.VideoError` for a video that cannot be read or has no frames."""
    path = Path(path)
    count = 0
    for frame in _folder_frames(path) if path.is_dir() else _file_frames(path):
        count += 1
        yield frame
    if count == 0:
        raise VideoError(f"video {str(path)!r} has no frames (zero-length video)")


def _file_frames(path: Path) -> Iterator[np.ndarray]:
    import eta.core.video as etav

    try:
        info = etav.VideoStreamInfo.build_for(str(path))  # ffprobe
    except IndexError:  # ffprobe found streams, none of them video
        raise VideoError(f"video {str(path)!r} cannot be read: it has no video stream") from None
    except Exception as error:  # ffprobe's errors, a missing ffmpeg
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        raise VideoError(f"video {str(path)!r} cannot be read (ffmpeg: {reason})") from None
    if info.total_frame_count == 0:
        raise VideoError(f"video {str(path)!r} has no frames (zero-length video)")
    with etav.FFmpegVideoReader(str(path)) as reader:
        for frame in reader:
            yield np.ascontiguousarray(frame)


def _folder_frames(path: Path) -> Iterator[np.ndarray]:
    for name in list_images(path):
        try:
            yield load_image(path / name)
        except ImageError as error:
            raise VideoError(f"frame folder {str(path)!r}: {error}") from None
