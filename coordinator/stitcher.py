"""Stitches the frames workers uploaded into one H.264 MP4.

ffmpeg comes from imageio-ffmpeg (a binary inside the wheel, so no system ffmpeg is
needed). We pipe the raw RGB24 parts straight into it ourselves: the parts are
already raw video, and imageio's writer spawns ffmpeg with a preexec_fn, which is
unsafe in a process with gRPC threads (ffmpeg died with a broken pipe there).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg

COPY_BLOCK = 1 << 20


@dataclass(frozen=True)
class FramePart:
    """One upload: `num_frames` raw RGB24 frames starting at global frame `first_frame`."""

    first_frame: int
    num_frames: int
    height: int
    width: int
    path: Path


def stitch(parts: list[FramePart], num_frames: int, out_path: Path, fps: float) -> tuple[int, str]:
    """Writes the video in frame order; returns (size in bytes, sha256). Refuses gaps and overlaps."""
    parts = sorted(parts, key=lambda p: p.first_frame)
    expected = 0
    for part in parts:
        if part.first_frame != expected:
            raise ValueError(f"frames {expected}..{part.first_frame - 1} missing or overlapping")
        expected += part.num_frames
    if expected != num_frames:
        raise ValueError(f"received {expected} frames, expected {num_frames}")
    height, width = parts[0].height, parts[0].width

    tmp = out_path.with_name(out_path.stem + ".partial" + out_path.suffix)  # ffmpeg picks the container by suffix
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", f"{fps:g}", "-i", "-",
           "-an", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "18", "-movflags", "+faststart", str(tmp)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for part in parts:
            with open(part.path, "rb") as f:
                while block := f.read(COPY_BLOCK):
                    proc.stdin.write(block)
        proc.stdin.close()
    except BrokenPipeError:
        pass  # ffmpeg exited early; its stderr below says why
    err = proc.stderr.read().decode(errors="replace")
    if proc.wait() != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"ffmpeg exited with {proc.returncode}: {err.strip()[-500:]}")
    os.replace(tmp, out_path)  # a reader never sees a half-written video

    digest = hashlib.sha256()
    with open(out_path, "rb") as f:
        for block in iter(lambda: f.read(COPY_BLOCK), b""):
            digest.update(block)
    return out_path.stat().st_size, digest.hexdigest()
