"""Streams the frames workers upload into one H.264 MP4 while the job still runs.

ffmpeg comes from imageio-ffmpeg (a binary inside the wheel, so no system ffmpeg is
needed). We pipe the raw RGB24 parts straight into it ourselves: the parts are
already raw video, and imageio's writer spawns ffmpeg with a preexec_fn, which is
unsafe in a process with gRPC threads (ffmpeg died with a broken pipe there).

One writer per job and one code path for every strategy: a part goes into ffmpeg as
soon as every frame before it has, so an unbounded stream never piles up on disk and
a job stopped early still has a playable video of its first frames.

A coordinator restart does not lose the frames encoded so far: ffmpeg runs in a session of
its own, so when the coordinator dies it reads end-of-input and closes the partial MP4
properly; `VideoWriter.resume` keeps that file as a segment (frames counted), the restarted
writer encodes the rest into the next one, and `finish` joins them without re-encoding.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg

COPY_BLOCK = 1 << 20


class VideoClosed(Exception):
    """The video was finished or aborted: no more parts."""


@dataclass(frozen=True)
class FramePart:
    """One upload: `num_frames` raw RGB24 frames starting at global frame `first_frame`."""

    first_frame: int
    num_frames: int
    height: int
    width: int
    path: Path

    @property
    def end(self) -> int:
        return self.first_frame + self.num_frames


class VideoWriter:
    """Writes parts in frame order into ffmpeg, started on the first part (its size, the job's fps).

    Calls block (pipe writes, encoding): make them from a thread, one at a time.
    """

    def __init__(self, out_path: Path, fps: float, segments: list[tuple[Path, int]] = ()):
        self.out_path = out_path
        self.fps = fps
        # ffmpeg picks the container by suffix
        self.partial_path = out_path.with_name(out_path.stem + ".partial" + out_path.suffix)
        self.segments = list(segments)  # (file, frames) encoded before a coordinator restart
        self.frames_written = sum(n for _, n in self.segments)
        self.closed = False
        self._held: dict[int, FramePart] = {}  # by first_frame: parts waiting for the gap before them
        self._proc: subprocess.Popen | None = None

    def add(self, part: FramePart) -> None:
        """Takes over the part's file: writes it (and the held parts it unblocks) or holds it.
        Raises (and deletes the file) after finish/abort or when it overlaps frames already received;
        RuntimeError when ffmpeg died."""
        if self.closed or part.first_frame < self.frames_written or any(
                part.first_frame < held.end and held.first_frame < part.end for held in self._held.values()):
            part.path.unlink(missing_ok=True)
            if self.closed:
                raise VideoClosed(f"{self.out_path.name} is already closed")
            raise ValueError(f"frames [{part.first_frame}, {part.end}) overlap frames already received")
        self._held[part.first_frame] = part
        while (ready := self._held.pop(self.frames_written, None)) is not None:
            self._write(ready)

    def drop_held(self) -> None:
        """Forgets the parts waiting for a gap (a retry renders their frames again)."""
        for part in self._held.values():
            part.path.unlink(missing_ok=True)
        self._held.clear()

    def missing(self, total: int) -> str:
        """The first gap before frame `total` (0: before the last held part), for errors; '' if none."""
        end = min(self._held, default=total)
        return f"frames [{self.frames_written}, {end}) missing" if end > self.frames_written else ""

    @classmethod
    def resume(cls, out_path: Path, fps: float, settle_s: float = 10.0) -> "VideoWriter":
        """The writer of a job whose coordinator died: the segments on disk, the partial MP4 the
        dead coordinator's ffmpeg closed (given `settle_s` to finish) as the last of them."""
        segments = []
        for index in range(1, 1_000_000):
            path = _segment_path(out_path, index)
            if not path.exists():
                break
            segments.append((path, _count_frames(path)))
        partial = out_path.with_name(out_path.stem + ".partial" + out_path.suffix)
        if partial.exists():
            deadline = time.monotonic() + settle_s
            while True:
                try:
                    frames = _count_frames(partial)
                    break
                except RuntimeError:
                    if time.monotonic() > deadline:
                        frames = 0  # unreadable: its frames are lost and rendered again
                        break
                    time.sleep(0.2)
            if frames:
                path = _segment_path(out_path, len(segments) + 1)
                os.replace(partial, path)
                segments.append((path, frames))
            else:
                partial.unlink()
        return cls(out_path, fps, segments)

    def finish(self) -> tuple[int, str]:
        """Closes the video with the frames written so far (held parts are dropped); returns (size, sha256)."""
        self._close()
        if self._proc is None and not self.segments:
            raise ValueError("no frames to write")
        if self._proc is not None:
            with suppress(BrokenPipeError):  # ffmpeg died: its exit status below says so
                self._proc.stdin.close()
            err = self._proc.stderr.read().decode(errors="replace")
            if self._proc.wait() != 0:
                self.partial_path.unlink(missing_ok=True)
                raise RuntimeError(f"ffmpeg exited with {self._proc.returncode}: {err.strip()[-500:]}")
        if self.segments:
            self._join()
        else:
            os.replace(self.partial_path, self.out_path)  # a reader never sees a half-written video

        digest = hashlib.sha256()
        with open(self.out_path, "rb") as f:
            for block in iter(lambda: f.read(COPY_BLOCK), b""):
                digest.update(block)
        return self.out_path.stat().st_size, digest.hexdigest()

    def _join(self) -> None:
        """The segments and the partial (if any frames went there) into out_path, stream-copied."""
        parts = [path for path, _ in self.segments] + ([self.partial_path] if self._proc is not None else [])
        listing = self.out_path.with_name(self.out_path.stem + ".segments.txt")
        listing.write_text("".join(f"file '{p.resolve()}'\n" for p in parts))
        joined = self.out_path.with_name(self.out_path.stem + ".joined" + self.out_path.suffix)
        done = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "concat", "-safe",
                               "0", "-i", str(listing), "-c", "copy", "-movflags", "+faststart", str(joined)],
                              capture_output=True, start_new_session=True)
        listing.unlink()
        if done.returncode != 0:
            raise RuntimeError(f"joining {len(parts)} segments failed: {done.stderr.decode(errors='replace')[-500:]}")
        os.replace(joined, self.out_path)
        for path in parts:
            path.unlink(missing_ok=True)

    def abort(self) -> None:
        """Stops ffmpeg and removes everything written."""
        self._close()
        for path, _ in self.segments:
            path.unlink(missing_ok=True)
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            with suppress(BrokenPipeError):
                self._proc.stdin.close()
            self._proc.stderr.close()
        self.partial_path.unlink(missing_ok=True)

    def _close(self) -> None:
        self.closed = True
        self.drop_held()

    def _write(self, part: FramePart) -> None:
        if self._proc is None:
            self._proc = self._start(part.height, part.width)
        try:
            with open(part.path, "rb") as f:
                while block := f.read(COPY_BLOCK):
                    self._proc.stdin.write(block)
            self._proc.stdin.flush()
        except BrokenPipeError:
            err = self._proc.stderr.read().decode(errors="replace")
            raise RuntimeError(f"ffmpeg exited with {self._proc.wait()}: {err.strip()[-500:]}") from None
        finally:
            part.path.unlink()
        self.frames_written += part.num_frames

    def _start(self, height: int, width: int) -> subprocess.Popen:
        cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", f"{self.fps:g}", "-i", "-",
               "-an", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "18", "-movflags", "+faststart",
               str(self.partial_path)]
        # a session of its own: a signal to the coordinator's group does not cut the encode short
        return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)


def _segment_path(out_path: Path, index: int) -> Path:
    return out_path.with_name(f"{out_path.stem}.seg{index}{out_path.suffix}")


def _count_frames(path: Path) -> int:
    try:
        frames, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    except Exception as exc:  # still being closed by the dead coordinator's ffmpeg, or cut short
        raise RuntimeError(f"{path.name}: {exc}") from None
    return frames
