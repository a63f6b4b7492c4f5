"""`clipmesh generate` end to end through the CLI: a real coordinator, real worker processes,
a real MP4 read back; nothing left running afterwards, also after Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import imageio.v3 as iio
import pytest

CLI = [sys.executable, "-m", "clipmesh.cli"]


def marked_env(tmp_path: Path) -> dict:
    """Environment with a marker every child process inherits (coordinator, workers, ffmpeg)."""
    return {**os.environ, "CLIPMESH_TEST_MARKER": str(tmp_path)}


def processes_marked(tmp_path: Path) -> list[str]:
    """Live processes (other than this one) carrying the marker: each one was left behind."""
    marker = f"CLIPMESH_TEST_MARKER={tmp_path}".encode() + b"\0"
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            if marker in Path(f"/proc/{pid}/environ").read_bytes():
                found.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return found


def test_generate_writes_every_frame_with_an_uneven_split(tmp_path, tiny_wan_folder):
    out, data = tmp_path / "video.mp4", tmp_path / "data"
    # 9 frames = 3 latent frames on 2 workers: clips of 2 and 1.
    proc = subprocess.run([*CLI, "generate", "a fox in the snow", "--frames", "9", "--workers", "2",
                           "--height", "32", "--width", "48", "--steps", "3", "--output", str(out),
                           "--keep-data", str(data)], capture_output=True, text=True, timeout=300,
                          env=marked_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    frames = iio.imread(out)
    assert frames.shape == (9, 32, 48, 3)
    assert f"wrote {out}" in proc.stdout
    for rank in (0, 1):
        assert f"[rank {rank} local-{rank}] step 3/3" in proc.stderr
    assert processes_marked(tmp_path) == []


def test_generate_bad_input_is_one_line_not_a_traceback(tmp_path, tiny_wan_folder):
    proc = subprocess.run([*CLI, "generate", "x", "--frames", "10", "--workers", "2", "--output",
                           str(tmp_path / "v.mp4"), "--keep-data", str(tmp_path / "d")],
                          capture_output=True, text=True, timeout=120, env=marked_env(tmp_path))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "INVALID_ARGUMENT: num_frames: must be 4*k+1" in proc.stderr
    assert processes_marked(tmp_path) == []


def test_generate_ctrl_c_leaves_no_process_behind(tmp_path, tiny_wan_folder):
    data = tmp_path / "data"
    proc = subprocess.Popen([*CLI, "generate", "a long one", "--frames", "9", "--workers", "2", "--steps", "200",
                             "--output", str(tmp_path / "v.mp4"), "--keep-data", str(data)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=marked_env(tmp_path))
    deadline = time.monotonic() + 120
    for line in proc.stderr:  # wait until the workers are rendering
        if "step 1/200" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    assert not (tmp_path / "v.mp4").exists()
    assert processes_marked(tmp_path) == []


@pytest.mark.parametrize("model,frames,latent", [("tiny-wan", 257, 65), ("tiny-unet3d", 257, 257)])
def test_generate_long_video_with_clip_parallel(tmp_path, model, frames, latent):
    """257 frames on 2 workers: far past both models' native length, so clip_parallel is what
    makes this cheap; every frame arrives and each worker reports its dual-scope traffic."""
    out = tmp_path / "long.mp4"
    proc = subprocess.run([*CLI, "generate", "a river through a forest", "--strategy", "clip_parallel",
                           "--frames", str(frames), "--workers", "2", "--model", model, "--height", "32",
                           "--width", "32", "--steps", "2", "--output", str(out), "--keep-data", str(tmp_path / "d")],
                          capture_output=True, text=True, timeout=600, env=marked_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert iio.imread(out).shape == (frames, 32, 32, 3)
    half = (latent + 1) // 2
    assert f"[rank 0 local-0] step 2/2 latent [0,{half})" in proc.stderr
    assert f"[rank 1 local-1] step 2/2 latent [{half},{latent})" in proc.stderr
    assert "comm" in proc.stderr  # halos and global K/V moved between the workers
    assert processes_marked(tmp_path) == []


def test_generate_long_video_with_block_pipeline(tmp_path):
    """257 frames on 2 workers splitting tiny-wan's 4 blocks 2+2: 65 latent frames in blocks of 8
    (the default) stream out block by block; every frame arrives, in order."""
    out = tmp_path / "blocks.mp4"
    proc = subprocess.run([*CLI, "generate", "a river through a forest", "--strategy", "block_pipeline",
                           "--frames", "257", "--workers", "2", "--height", "32", "--width", "32", "--steps", "2",
                           "--output", str(out), "--keep-data", str(tmp_path / "d")],
                          capture_output=True, text=True, timeout=600, env=marked_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert iio.imread(out).shape == (257, 32, 32, 3)
    for rank in (0, 1):  # both stages ran the last block (latent [64, 65)) through its last step
        assert f"[rank {rank} local-{rank}] block 8 step 2/2 latent [64,65)" in proc.stderr
    firsts = [int(line.split("frames ")[1].split("..")[0]) for line in proc.stderr.splitlines()
              if line.startswith("frames ") and " received from " in line]
    assert firsts == [0, 29] + [29 + 32 * i for i in range(1, 8)]  # 9 blocks: 29 frames, then 32 each
    assert processes_marked(tmp_path) == []


def test_ctrl_c_ends_an_endless_stream_and_keeps_its_frames(tmp_path, tiny_wan_folder):
    """--frames 0 streams until stopped: Ctrl-C cancels the job and writes the frames finished so far."""
    out = tmp_path / "endless.mp4"
    proc = subprocess.Popen([*CLI, "generate", "an endless road", "--frames", "0", "--workers", "2",
                             "--block-frames", "2", "--context-frames", "1", "--height", "32", "--width", "32",
                             "--steps", "2", "--output", str(out), "--keep-data", str(tmp_path / "d")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=marked_env(tmp_path))
    received, deadline = 0, time.monotonic() + 180
    for line in proc.stderr:  # wait until two blocks have streamed in
        received += " received from " in line
        if received == 2 or time.monotonic() > deadline:
            break
    assert received == 2
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130
    kept = int(stdout.split(f"wrote {out} (")[1].split(" frames")[0])
    assert kept >= 5 + 8 and iio.imread(out).shape == (kept, 32, 32, 3)
    assert processes_marked(tmp_path) == []
