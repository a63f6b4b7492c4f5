"""block_pipeline end to end through real daemons: a coordinator and two worker processes split
tiny-wan's layers; the video streams out block by block while the job runs."""

from __future__ import annotations

import imageio.v3 as iio
import pytest

from clipmesh.v1 import clipmesh_pb2 as pb
from conftest import Daemons

WORKERS = {"s0", "s1"}
STREAM = dict(height=32, width=32, num_inference_steps=2, fps=8.0, strategy="block_pipeline", num_workers=2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_wan_folder):
    d = Daemons(tmp_path_factory.mktemp("stream-cluster"))
    d.coordinator("--heartbeat-timeout", "5", "--collective-timeout", "30")
    for name in sorted(WORKERS):
        d.worker(name)
    with d.client() as client:
        d.wait_idle(client, WORKERS, timeout=180)
    yield d
    d.stop()


def test_frames_stream_in_order_while_blocks_are_denoised(cluster, tmp_path):
    # 41 frames = 11 latent frames: blocks 3+3+3+2 -> video frames 9, 12, 12, 8
    options = pb.BlockPipelineOptions(block_frames=3, context_frames=1)
    with cluster.client() as client:
        job = client.submit("a paper boat on a stream", num_frames=41, block_pipeline=options, **STREAM)
        events = list(client.watch(job.id))
        job = client.get(job.id)
        assert job.state == pb.SUCCEEDED, job.error + cluster.logs()
        assert job.strategy == "block_pipeline" and job.video_frames == 41

        received = [(e.seq, e.frames.first_frame, e.frames.num_frames) for e in events if e.HasField("frames")]
        assert [(f, n) for _, f, n in received] == [(0, 9), (9, 12), (21, 12), (33, 8)]  # in order, exact count
        steps = [e for e in events if e.HasField("step")]
        # (that frames arrive while the job runs is proven below: an unbounded job never ends by itself)
        # the diagonal: both stages ran every block through both steps
        assert {(e.step.rank, e.step.block, e.step.step) for e in steps} == \
            {(r, b, s) for r in (0, 1) for b in range(4) for s in (1, 2)}
        assert all(e.step.HasField("block") and e.step.total_steps == 2 for e in steps)
        assert {(e.step.block, e.step.latent_start, e.step.latent_end) for e in steps} == \
            {(0, 0, 3), (1, 3, 6), (2, 6, 9), (3, 9, 11)}

        video = tmp_path / "stream.mp4"
        client.fetch(job.id, video)
        assert iio.imread(video).shape == (41, 32, 32, 3)


def test_cancelling_an_unbounded_stream_keeps_a_playable_video(cluster, tmp_path):
    options = pb.BlockPipelineOptions(block_frames=2, context_frames=1)
    with cluster.client() as client:
        cluster.wait_idle(client, WORKERS)
        job = client.submit("an endless train ride", num_frames=0, block_pipeline=options, **STREAM)
        seen = 0
        for event in client.watch(job.id):
            if event.HasField("frames"):
                seen += event.frames.num_frames
                if seen == 5 + 8 + 8:  # three blocks: 5, 8 and 8 frames (the first block is 1 + 4); cancel once
                    client.cancel(job.id)
        job = client.get(job.id)
        assert job.state == pb.CANCELLED, job.error + cluster.logs()
        # the video keeps the unbroken run of received frames from frame 0: a part of a later block
        # that came in before the one ahead of it (another rank decodes it) waits for the gap, and
        # is dropped with it when the job ends
        parts = {e.frames.first_frame: e.frames.num_frames for e in client.watch(job.id) if e.HasField("frames")}
        kept = 0
        while kept in parts:
            kept += parts[kept]
        assert job.video_frames == kept >= 21, (job.video_frames, sorted(parts.items()))
        video = tmp_path / "kept.mp4"
        client.fetch(job.id, video)
        assert iio.imread(video).shape == (kept, 32, 32, 3)  # a playable video of every block finished so far
        cluster.wait_idle(client, WORKERS, timeout=60)  # both workers stopped and serve again
