"""Streaming output through a real coordinator daemon, with the test playing the worker over
real gRPC: parts go into the video as they arrive (in any order), an unbounded job keeps the
frames finished before its cancel, and a job with a hole fails without harming the next one."""

from __future__ import annotations

import queue
import threading

import grpc
import pytest

from clipmesh import cli
from clipmesh.v1 import clipmesh_pb2 as pb
from conftest import TOKEN
from fake_worker import HEIGHT, WAIT, WIDTH, FakeWorker, assert_frames_in_order, drain

SMALL = dict(height=HEIGHT, width=WIDTH, num_inference_steps=2, fps=8.0, num_workers=1)

class Events:
    """A job's WatchJob stream, read in the background so the test can wait on each event."""

    def __init__(self, client, job_id: str):
        self.queue: queue.Queue = queue.Queue()
        self.seen: list[pb.JobEvent] = []
        threading.Thread(target=drain, args=(client.watch(job_id), self.queue), daemon=True).start()

    def wait_for(self, matches) -> pb.JobEvent:
        while True:
            event = self.queue.get(timeout=WAIT)
            self.seen.append(event)
            if matches(event):
                return event

    def frames(self, first: int) -> pb.JobEvent:
        return self.wait_for(lambda e: e.HasField("frames") and e.frames.first_frame == first)

    def final(self) -> pb.StateChange:
        return self.wait_for(lambda e: e.HasField("state") and e.state.state in (pb.SUCCEEDED, pb.FAILED,
                                                                                  pb.CANCELLED)).state


@pytest.fixture
def coordinator(daemons):
    daemons.coordinator("--heartbeat-timeout", "120")  # the fake worker sends no heartbeats
    worker = FakeWorker(daemons.address, "fake-0")
    yield daemons, worker
    worker.close()


def part_files(daemons, job_id: str) -> list[str]:
    return sorted(p.name.split("-")[1] for p in (daemons.tmp / "data" / "jobs" / job_id).glob("*.rgb"))


def test_parts_out_of_order_are_streamed_into_an_ordered_video(coordinator, tmp_path):
    daemons, worker = coordinator
    with daemons.client() as client:
        job = client.submit("colours", num_frames=9, strategy="exact", **SMALL)
        assignment = worker.expect("assignment")
        assert assignment.job_id == job.id
        events = Events(client, job.id)

        assert worker.upload(job.id, 6, 9) == 3
        events.frames(6)  # reported at once, while the job still runs
        assert part_files(daemons, job.id) == ["000006"]  # held: frames 0..5 are not in yet
        worker.upload(job.id, 0, 3)
        events.frames(0)
        assert part_files(daemons, job.id) == ["000006"]  # 0..2 went into ffmpeg and off the disk
        worker.upload(job.id, 3, 6)
        events.frames(3)
        assert part_files(daemons, job.id) == []  # 3..5 filled the gap: 3..8 written
        assert client.get(job.id).state == pb.RUNNING

        worker.send(result=pb.JobResult(job_id=job.id, outcome=pb.JOB_OUTCOME_DONE))
        assert events.final().state == pb.SUCCEEDED
        job = client.get(job.id)
        assert (job.state, job.video_frames) == (pb.SUCCEEDED, 9), job.error
        out = tmp_path / "v.mp4"
        assert client.fetch(job.id, out) == job.video_size
        assert_frames_in_order(out, 9)


def test_unbounded_job_cancelled_keeps_the_frames_streamed_so_far(coordinator, tmp_path, capsys):
    daemons, worker = coordinator
    address = ["--address", daemons.address, "--token", TOKEN]
    assert cli.main(["submit", "endless colours", "--frames", "0", "--strategy", "block_pipeline",
                     "--block-frames", "2", "--num-workers", "1", "--height", str(HEIGHT), "--width", str(WIDTH),
                     "--steps", "2", *address]) == 0
    job_id = capsys.readouterr().out.strip()
    assignment = worker.expect("assignment")
    assert assignment.job_id == job_id
    assert assignment.plan.request.num_frames == 0
    assert assignment.plan.request.block_pipeline == pb.BlockPipelineOptions(block_frames=2)  # only what was given

    with daemons.client() as client:
        events = Events(client, job_id)
        blocks = [(0, 5), (5, 9), (9, 13)]  # the first block has the extra leading frame
        for block, (first, end) in enumerate(blocks):
            for step in (1, 2):
                worker.step(job_id, block, step, 2)
            events.wait_for(lambda e: e.HasField("step") and (e.step.block, e.step.step) == (block, 2))
            assert worker.upload(job_id, first, end) == end - first
            events.frames(first)
        steps = [(e.step.block, e.step.step) for e in events.seen if e.HasField("step")]
        assert steps == [(b, s) for b in range(3) for s in (1, 2)]

        job = client.cancel(job_id)
        assert (job.state, job.video_frames) == (pb.CANCELLED, 13)
        assert "kept 13 frames" in events.final().detail
        assert worker.expect("cancel").job_id == job_id

        with pytest.raises(grpc.RpcError) as late:  # a block finished as the cancel arrived
            worker.upload(job_id, 13, 17)
        assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        worker.send(result=pb.JobResult(job_id=job_id, outcome=pb.JOB_OUTCOME_CANCELLED, error="cancelled"))

        out = tmp_path / "kept.mp4"
        assert cli.main(["fetch", job_id, "--output", str(out), *address]) == 0
        after = client.get(job_id)
        assert (after.video_frames, after.video_sha256) == (13, job.video_sha256)  # the late block lost nothing
        assert_frames_in_order(out, 13)

    capsys.readouterr()
    assert cli.main(["watch", job_id, *address]) == 1  # replays, ends CANCELLED
    lines = capsys.readouterr().err
    assert "[rank 0 fake-0] block 2 step 2/2 latent [4,6)" in lines
    assert "CANCELLED (cancelled by client; kept 13 frames)" in lines


def test_missing_part_fails_the_job_and_the_next_job_is_served(coordinator, tmp_path):
    daemons, worker = coordinator
    with daemons.client() as client:
        job = client.submit("a hole", num_frames=9, **SMALL)
        worker.expect("assignment")
        events = Events(client, job.id)
        worker.upload(job.id, 0, 3)
        worker.upload(job.id, 6, 9)
        with pytest.raises(grpc.RpcError) as overlap:
            worker.upload(job.id, 2, 4)
        assert overlap.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        worker.send(result=pb.JobResult(job_id=job.id, outcome=pb.JOB_OUTCOME_DONE))
        assert events.final().state == pb.FAILED
        job = client.get(job.id)
        assert job.state == pb.FAILED and "frames [3, 6) missing" in job.error, job.error
        assert job.video_frames == 3  # the frames before the hole stay watchable
        assert part_files(daemons, job.id) == []

        nxt = client.submit("after the hole", num_frames=9, **SMALL)
        assert worker.expect("assignment").job_id == nxt.id  # the worker was freed, the coordinator serves on
        events = Events(client, nxt.id)
        worker.upload(nxt.id, 0, 9)
        worker.send(result=pb.JobResult(job_id=nxt.id, outcome=pb.JOB_OUTCOME_DONE))
        assert events.final().state == pb.SUCCEEDED
        out = tmp_path / "next.mp4"
        client.fetch(nxt.id, out)
        assert_frames_in_order(out, 9)


def test_video_of_a_job_without_frames_is_refused(coordinator):
    daemons, worker = coordinator
    with daemons.client() as client:
        job = client.submit("nothing yet", num_frames=0, strategy="block_pipeline", **SMALL)
        worker.expect("assignment")
        assert client.cancel(job.id).video_size == 0
        with pytest.raises(grpc.RpcError) as err:
            client.fetch(job.id, daemons.tmp / "none.mp4")
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
