"""A long video keeps moving the way the prompt asked (issue 20): toy-wan at 8x its native
length (157 frames), through the real system (a coordinator and 2 worker processes, jobs over
gRPC, the MP4 read back by the toy world's detector), under clip_parallel's defaults. The torus
world gives every window of 17 frames a truth: the prompt's direction at the world's speed.

The control is the same job on the first 2 prompts with the whole denoise in the global phase
(global_phase 1.0, what a too long global phase does: every frame attends to the same global
frames, so the object stands still): on the same 2 prompts the defaults must keep the object
moving in clearly more of the windows, at a speed nearer the world's, and the whole track going
the named way. Margins are asserted, not absolute shares of 4 videos (bench/quality.py measures
those on 32 videos per row, docs/quality.md), except one floor: the prompt's colour in at least
0.8 of the frames (these 4 videos read 0.96 on the retrained toy-wan; 0.45 over 32 before, when
its VAE lost the colour beyond ~20 frames).
"""

from __future__ import annotations

import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from clipmesh import toyworld

FRAMES, NATIVE = 157, 17
PROMPTS = [("a red circle moving right", 1), ("a green square moving down", 1), ("a blue triangle moving left", 1),
           ("a yellow circle moving up", 1)]  # bench.quality's first 4 prompts and seed


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from clipmesh.local import LocalCluster
    data = tmp_path_factory.mktemp("long-video")
    with LocalCluster("toy-wan", 2, data) as c:
        c.start_workers()
        yield c, data


KEYS = ("present", "colour", "direction", "window_direction", "speed_error", "identity")


def mean(seen: list[dict]) -> dict:
    return {k: float(np.mean([s[k] for s in seen])) for k in KEYS}


def readings(cluster, prompts, **request) -> list[dict]:
    """The detector's reading of each 157-frame video of `prompts` made with `request`."""
    from clipmesh.v1 import clipmesh_pb2 as pb
    c, data = cluster
    jobs = [(prompt, c.client.submit(prompt, model="toy-wan", num_frames=FRAMES, height=64, width=64,
                                     num_inference_steps=8, guidance_scale=5.0, seed=seed, num_workers=2, **request))
            for prompt, seed in prompts]
    seen = []
    for prompt, job in jobs:
        deadline = time.monotonic() + 240
        while (done := c.client.get(job.id)).state not in (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED):
            assert time.monotonic() < deadline, f"{prompt}: still {pb.JobState.Name(done.state)}"
            time.sleep(0.2)
        assert done.state == pb.SUCCEEDED, done.error
        path = Path(data) / f"{job.id}.mp4"
        c.client.fetch(job.id, path)
        video = iio.imread(path, index=None)
        assert video.shape == (FRAMES, 64, 64, 3)
        scene = toyworld.scene_of(prompt)
        detections = toyworld.track(video)
        reading = toyworld.prompt_accuracy(detections, scene)
        motion = toyworld.window_motion(detections, NATIVE, scene)
        reading.update(window_direction=motion["direction"], speed_error=motion["speed_error"])
        reading["identity"] = toyworld.identity_kept(detections)
        seen.append(reading)
    return seen


def test_clip_parallel_keeps_the_motion_at_8x_the_native_length(cluster):
    each = readings(cluster, PROMPTS, strategy="clip_parallel")
    # the control on the first 2 prompts (a contrast, not a share: half the time), against the same 2
    frozen = mean(readings(cluster, PROMPTS[:2], strategy="clip_parallel", clip_parallel=dict(global_phase=1.0)))
    got, paired = mean(each), mean(each[:2])
    print("clip_parallel at 8x:", got, "\nits first 2:", paired, "\nglobal phase throughout:", frozen)
    assert got["present"] >= 0.8, got  # the object stays in the picture
    assert paired["window_direction"] >= frozen["window_direction"] + 0.15, (paired, frozen)
    assert paired["speed_error"] < frozen["speed_error"], (paired, frozen)
    assert paired["direction"] >= frozen["direction"] + 0.5, (paired, frozen)
    assert got["colour"] >= 0.8, got
