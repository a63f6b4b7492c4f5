"""Stitches the frames workers uploaded into one H.264 MP4 (imageio-ffmpeg)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import imageio.v2 as imageio
import numpy as np


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

    tmp = out_path.with_name(out_path.name + ".partial")
    # macro_block_size=1: our sizes are already even; imageio would otherwise resize to multiples of 16.
    writer = imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                pixelformat="yuv420p", macro_block_size=1, quality=8)
    try:
        for part in parts:
            frames = np.fromfile(part.path, dtype=np.uint8).reshape(part.num_frames, part.height, part.width, 3)
            for frame in frames:
                writer.append_data(frame)
    finally:
        writer.close()
    os.replace(tmp, out_path)  # a reader never sees a half-written video

    digest = hashlib.sha256()
    with open(out_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return out_path.stat().st_size, digest.hexdigest()
