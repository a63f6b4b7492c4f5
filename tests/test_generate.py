"""`clipmesh generate` end to end through the CLI: a real coordinator, real worker processes,
a real MP4 read back; nothing left running afterwards, also after Ctrl-C."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import imageio.v3 as iio
import pytest

CLI = [sys.executable, "-m", "clipmesh.cli"]


def marked_env(tmp_path: Path) -> dict:
    """Environment with a marker every child process inherits (coordinator, workers, ffmpeg)."""
    return {**os.environ, "CLIPMESH_TEST_MARKER": str(tmp_path)}


def pids_marked(tmp_path: Path) -> list[int]:
    marker = f"CLIPMESH_TEST_MARKER={tmp_path}".encode() + b"\0"
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            if marker in Path(f"/proc/{pid}/environ").read_bytes():
                found.append(int(pid))
        except OSError:
            continue
    return found


def processes_marked(tmp_path: Path) -> list[str]:
    """Live processes (other than this one) carrying the marker: each one was left behind."""
    found = []
    for pid in pids_marked(tmp_path):
        try:
            found.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return found


@pytest.fixture(autouse=True)
def reap(tmp_path):
    """After the test (and its own `processes_marked(...) == []` check): kill whatever a failed
    test left running, so it does not load the tests after it."""
    yield
    for pid in pids_marked(tmp_path):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


class Cli:
    """`clipmesh ...` as a child process whose stdout and stderr are read in the background
    (so a full pipe never blocks it); the test waits on stderr lines with a real deadline."""

    def __init__(self, args: list[str], tmp_path: Path):
        self.proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=marked_env(tmp_path))
        self.out: list[str] = []
        self.err: list[str] = []
        self.lines: queue.Queue = queue.Queue()  # stderr lines, then None at its end
        self.readers = [threading.Thread(target=self._read, args=(self.proc.stdout, self.out, None), daemon=True),
                        threading.Thread(target=self._read, args=(self.proc.stderr, self.err, self.lines), daemon=True)]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _read(stream, into: list[str], lines: queue.Queue | None) -> None:
        for line in stream:
            into.append(line)
            if lines is not None:
                lines.put(line)
        if lines is not None:
            lines.put(None)

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def wait_for(self, matches, timeout: float) -> str | None:
        """The first stderr line (from here on) that matches, or None at the deadline or the end."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            if line is None:
                self.lines.put(None)  # stays at the end for a later wait
                return None
            if matches(line):
                return line

    def interrupt(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)

    def wait(self, timeout: float) -> int:
        """The exit status; on timeout: Ctrl-C (so the CLI stops what it started), then fail."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.interrupt()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            for reader in self.readers:
                reader.join(timeout=5)
            pytest.fail(f"clipmesh {' '.join(self.proc.args[3:])!r} still running after {timeout}s\n"
                        f"{self.stderr[-3000:]}")
        for reader in self.readers:
            reader.join(timeout=10)
        return self.proc.returncode


def run_cli(args: list[str], tmp_path: Path, timeout: float) -> subprocess.CompletedProcess:
    cli = Cli(args, tmp_path)
    returncode = cli.wait(timeout)
    return subprocess.CompletedProcess(cli.proc.args, returncode, cli.stdout, cli.stderr)


# Timeouts: a test's waits added up (plus the 20 s a timed-out CLI gets to stop after its Ctrl-C,
# and the readers' joins) end before its pytest timeout (300 s from pyproject.toml unless marked),
# so a hang fails here with the CLI's output, not in pytest's timeout with a stack dump.


def test_generate_writes_every_frame_with_an_uneven_split(tmp_path, tiny_wan_folder):
    out, data = tmp_path / "video.mp4", tmp_path / "data"
    # 9 frames = 3 latent frames on 2 workers: clips of 2 and 1.
    proc = run_cli(["generate", "a fox in the snow", "--frames", "9", "--workers", "2",
                    "--height", "32", "--width", "48", "--steps", "3", "--output", str(out),
                    "--keep-data", str(data)], tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr
    frames = iio.imread(out)
    assert frames.shape == (9, 32, 48, 3)
    assert f"wrote {out}" in proc.stdout
    for rank in (0, 1):
        assert f"[rank {rank} local-{rank}] step 3/3" in proc.stderr
    assert processes_marked(tmp_path) == []


def test_generate_bad_input_is_one_line_not_a_traceback(tmp_path, tiny_wan_folder):
    proc = run_cli(["generate", "x", "--frames", "10", "--workers", "2", "--output",
                    str(tmp_path / "v.mp4"), "--keep-data", str(tmp_path / "d")], tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "INVALID_ARGUMENT: num_frames: must be 4*k+1" in proc.stderr
    assert processes_marked(tmp_path) == []


def test_generate_ctrl_c_leaves_no_process_behind(tmp_path, tiny_wan_folder):
    data = tmp_path / "data"
    cli = Cli(["generate", "a long one", "--frames", "9", "--workers", "2", "--steps", "200",
               "--output", str(tmp_path / "v.mp4"), "--keep-data", str(data)], tmp_path)
    # Ctrl-C only once the workers are rendering: the job is RUNNING and a rank reported a step
    running = cli.wait_for(lambda line: line.startswith("job ") and ": RUNNING" in line, 150)
    assert running, f"the job never ran:\n{cli.stderr[-3000:]}"
    step = cli.wait_for(lambda line: line.startswith("[rank ") and " step 1/200 " in line, 45)
    assert step, f"no worker reported its first step:\n{cli.stderr[-3000:]}"
    assert cli.proc.poll() is None  # still rendering when interrupted
    cli.interrupt()
    assert cli.wait(timeout=60) == 130, cli.stderr[-3000:]
    assert " step 200/200 " not in cli.stderr  # interrupted mid-render, not after it
    assert not (tmp_path / "v.mp4").exists()
    assert processes_marked(tmp_path) == []


@pytest.mark.timeout(660)
@pytest.mark.parametrize("model,frames,latent", [("tiny-wan", 257, 65), ("tiny-unet3d", 257, 257)])
def test_generate_long_video_with_clip_parallel(tmp_path, model, frames, latent):
    """257 frames on 2 workers: far past both models' native length, so clip_parallel is what
    makes this cheap; every frame arrives and each worker reports its dual-scope traffic."""
    out = tmp_path / "long.mp4"
    proc = run_cli(["generate", "a river through a forest", "--strategy", "clip_parallel",
                    "--frames", str(frames), "--workers", "2", "--model", model, "--height", "32",
                    "--width", "32", "--steps", "2", "--output", str(out), "--keep-data", str(tmp_path / "d")],
                   tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert iio.imread(out).shape == (frames, 32, 32, 3)
    half = (latent + 1) // 2
    assert f"[rank 0 local-0] step 2/2 latent [0,{half})" in proc.stderr
    assert f"[rank 1 local-1] step 2/2 latent [{half},{latent})" in proc.stderr
    assert "comm" in proc.stderr  # halos and global K/V moved between the workers
    assert processes_marked(tmp_path) == []


@pytest.mark.timeout(660)
def test_generate_long_video_with_block_pipeline(tmp_path):
    """257 frames on 2 workers splitting tiny-wan's 4 blocks 2+2: 65 latent frames in blocks of 8
    (the default) stream out block by block; every frame arrives, in order."""
    out = tmp_path / "blocks.mp4"
    proc = run_cli(["generate", "a river through a forest", "--strategy", "block_pipeline",
                    "--frames", "257", "--workers", "2", "--height", "32", "--width", "32", "--steps", "2",
                    "--output", str(out), "--keep-data", str(tmp_path / "d")], tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert iio.imread(out).shape == (257, 32, 32, 3)
    for rank in (0, 1):  # both stages ran the last block (latent [64, 65)) through its last step
        assert f"[rank {rank} local-{rank}] block 8 step 2/2 latent [64,65)" in proc.stderr
    pieces = [(int(line.split("frames ")[1].split("..")[0]), int(line.split("..")[1].split(" ")[0]),
               line.split(" received from ")[1]) for line in proc.stderr.splitlines()
              if line.startswith("frames ") and " received from " in line]
    # block j is decoded by rank j mod 2 (no rank decodes the whole stream), in chunks: the pieces
    # tile [0, 257) once; each worker's arrive in order; the coordinator puts them together
    tiles = sorted((first, last) for first, last, _ in pieces)
    assert tiles[0][0] == 0 and tiles[-1][1] == 256
    assert all(b[0] == a[1] + 1 for a, b in zip(tiles, tiles[1:]))
    assert {sender for _, _, sender in pieces} == {"local-0", "local-1"}
    for worker in ("local-0", "local-1"):
        mine = [first for first, _, sender in pieces if sender == worker]
        assert mine == sorted(mine)
    assert processes_marked(tmp_path) == []


@pytest.mark.timeout(360)
def test_ctrl_c_ends_an_endless_stream_and_keeps_its_frames(tmp_path, tiny_wan_folder):
    """--frames 0 streams until stopped: Ctrl-C cancels the job and writes the frames finished so far."""
    out = tmp_path / "endless.mp4"
    cli = Cli(["generate", "an endless road", "--frames", "0", "--workers", "2",
               "--block-frames", "2", "--context-frames", "1", "--height", "32", "--width", "32",
               "--steps", "2", "--output", str(out), "--keep-data", str(tmp_path / "d")], tmp_path)
    received, deadline = 0, time.monotonic() + 180
    while received < 2:  # wait until two blocks have streamed in
        line = cli.wait_for(lambda line: " received from " in line, max(0.0, deadline - time.monotonic()))
        if line is None:
            break
        received += 1
    assert received == 2, cli.stderr[-3000:]
    cli.interrupt()
    assert cli.wait(timeout=120) == 130, cli.stderr[-3000:]
    stdout = cli.stdout
    kept = int(stdout.split(f"wrote {out} (")[1].split(" frames")[0])
    assert kept >= 5 + 8 and iio.imread(out).shape == (kept, 32, 32, 3)
    assert processes_marked(tmp_path) == []
