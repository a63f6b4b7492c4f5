"""OpenAI's Videos API on the coordinator (`--http`), driven by the real `openai` SDK against a
real coordinator and real workers: create, retrieve to completed, download a playable MP4, list,
a bad request named by field, delete stopping a running job, the events as SSE, credentials."""

from __future__ import annotations

import json
import urllib.request

import imageio.v3 as iio
import openai
import pytest

from clipmesh.v1 import clipmesh_pb2 as pb
from conftest import TOKEN, Daemons, wait_until

# the SDK warns that OpenAI's own video service is to shut down: this is clipmesh's
pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    """One coordinator and two workers for the module (their start-up is most of its time)."""
    daemons = Daemons(tmp_path_factory.mktemp("http"))
    try:
        yield _start(daemons)
    finally:
        daemons.stop()


def _start(daemons):
    port_file = daemons.tmp / "http.port"
    daemons.coordinator("--http", "127.0.0.1:0", "--http-port-file", str(port_file))
    for name in ("h0", "h1"):
        daemons.worker(name)
    wait_until(port_file.exists, 30, "the HTTP port", daemons)
    with daemons.client() as client:
        daemons.wait_idle(client, {"h0", "h1"})
    base = f"http://127.0.0.1:{port_file.read_text()}"
    return daemons, base, openai.OpenAI(base_url=f"{base}/v1", api_key=TOKEN, max_retries=0)


def test_the_openai_sdk_creates_polls_downloads_and_lists(farm, tmp_path):
    daemons, base, sdk = farm
    video = sdk.videos.create(prompt="a red circle moving right", model="tiny-wan", seconds="2", size="64x64",
                              extra_body={"steps": 2, "workers": 2, "fps": 8})
    assert video.status in ("queued", "in_progress") and video.size == "64x64"  # placed at once: idle workers
    wait_until(lambda: sdk.videos.retrieve(video.id).status == "completed", 120, "the video", daemons)
    done = sdk.videos.retrieve(video.id)
    assert done.progress == 100 and done.model == "tiny-wan" and done.seconds == "2.125"  # 17 frames at 8 fps
    sdk.videos.download_content(video.id).write_to_file(tmp_path / "v.mp4")
    assert iio.imread(tmp_path / "v.mp4").shape == (17, 64, 64, 3)  # 2 s at 8 fps -> 4k+1 = 17 frames
    assert video.id in [v.id for v in sdk.videos.list()]

    # the events as Server-Sent Events: replay, then live, ending with the final state
    with urllib.request.urlopen(urllib.request.Request(f"{base}/v1/videos/{video.id}/events",
                                                       headers={"Authorization": f"Bearer {TOKEN}"})) as stream:
        events = [json.loads(line[6:]) for line in stream.read().decode().splitlines() if line.startswith("data: ")]
    kinds = [next(k for k in ("state", "step", "frames", "log") if k in e) for e in events]
    assert kinds[0] == "state" and "step" in kinds and events[-1]["state"]["state"] == "SUCCEEDED"
    # a range request, as a browser's player seeks
    ranged = urllib.request.Request(f"{base}/v1/videos/{video.id}/content",
                                    headers={"Authorization": f"Bearer {TOKEN}", "Range": "bytes=0-99"})
    with urllib.request.urlopen(ranged) as part:
        assert part.status == 206 and len(part.read()) == 100


def test_bad_requests_credentials_and_delete_of_a_running_job(farm):
    daemons, base, sdk = farm
    with pytest.raises(openai.BadRequestError) as err:
        sdk.videos.create(prompt="a cat", model="tiny-wan", size="63x64")
    assert "width: must be a multiple of 16" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:  # image-to-video: refused, not ignored
        sdk.videos.create(prompt="a cat", model="tiny-wan", input_reference=("ref.png", b"\x89PNG", "image/png"))
    assert "input_reference" in str(err.value)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).videos.list()

    running = sdk.videos.create(prompt="a long one", model="tiny-wan", size="64x64",
                                extra_body={"num_frames": 33, "steps": 200, "workers": 2})
    wait_until(lambda: sdk.videos.retrieve(running.id).progress > 0, 120, "the job to make progress", daemons)
    assert sdk.videos.delete(running.id).deleted
    with daemons.client() as client:  # its workers stopped within a step, and are free again
        daemons.wait_idle(client, {"h0", "h1"}, timeout=30)
        wait_until(lambda: running.id not in [j.id for j in client.jobs()], 30, "the job deleted", daemons)
        assert all(w.current_job_id == "" for w in client.workers())
    with pytest.raises(openai.NotFoundError):
        sdk.videos.retrieve(running.id)
    with daemons.client() as client:  # gRPC's DeleteJob, on a finished job
        job = client.submit("short", num_frames=5, num_inference_steps=1, height=32, width=32)
        wait_until(lambda: client.get(job.id).state == pb.SUCCEEDED, 120, "the short job", daemons)
        assert not client._call(client._stub.DeleteJob, pb.DeleteJobRequest(job_id=job.id)).was_running
        assert job.id not in [j.id for j in client.jobs()]
