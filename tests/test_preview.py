"""Watching a long video grow: GetPreview / GET /v1/videos/{id}/preview give the newest frame a
running job's video has received, as a PNG, through a real coordinator and real workers."""

from __future__ import annotations

import io
import urllib.error
import urllib.request

import grpc
import numpy as np
import PIL.Image
import pytest

from clipmesh.v1 import clipmesh_pb2 as pb
from conftest import TOKEN, wait_until


def _png(data: bytes) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(data)).convert("RGB"))


def test_a_growing_video_is_seen_frame_by_frame(daemons, tmp_path):
    port_file = tmp_path / "http.port"
    daemons.coordinator("--http", "127.0.0.1:0", "--http-port-file", str(port_file))
    for name in ("p0", "p1"):
        daemons.worker(name)
    wait_until(port_file.exists, 30, "the HTTP port", daemons)
    client = daemons.client()
    daemons.wait_idle(client, {"p0", "p1"})
    base = f"http://127.0.0.1:{port_file.read_text()}/v1/videos"

    # an endless block_pipeline job: its blocks' frames reach the coordinator while it runs
    job = client.submit("a red circle moving right", strategy="block_pipeline", num_frames=0, num_workers=2,
                        height=64, width=64, num_inference_steps=2)
    waiting = client.submit("queued behind it", num_frames=17, height=64, width=64, num_workers=2)
    with pytest.raises(grpc.RpcError) as err:
        client.preview(waiting.id)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "has no frame yet" in err.value.details()
    client.cancel(waiting.id)
    first = None

    def arrived() -> bool:
        nonlocal first
        try:
            first = client.preview(job.id)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
            return False
        return True

    wait_until(arrived, 120, "the first frames", daemons)
    assert _png(first.png).shape == (64, 64, 3) and first.frames_written >= 1 and first.frame >= 0
    request = urllib.request.Request(f"{base}/{job.id}/preview", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request) as response:
        assert response.headers["Content-Type"] == "image/png"
        assert _png(response.read()).shape == (64, 64, 3)
    wait_until(lambda: client.preview(job.id).frame > first.frame, 120, "the video to grow", daemons)

    client.cancel(job.id)
    wait_until(lambda: client.get(job.id).state == pb.CANCELLED, 60, "the job to stop", daemons)
    with pytest.raises(grpc.RpcError) as err:
        client.preview(job.id)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "fetch its video" in err.value.details()
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(request)
    assert missing.value.code == 404
