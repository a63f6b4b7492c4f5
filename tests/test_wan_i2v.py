"""Image-to-video on Wan (WanImageToVideoPipeline folders saved by diffusers' own save_pretrained):
tiny-wan-i2v is Wan 2.1 I2V's layout (36 input channels, a CLIP vision encoder read by every
block's cross-attention), tiny-wan22-i2v Wan 2.2 I2V-A14B's (36 channels, two experts, no image
encoder).

The oracle is the stock pipeline given the same image and the same initial latents: every frames
strategy at 1, 2 and 3 workers within 1e-5 (at 17 frames clip_parallel is exact), and a video
longer than the VAE encoder's receptive field, where a clip's condition is encoded without the
video (wan_encode.py). block_pipeline: N stages equal 1 stage.
"""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request

import grpc
import numpy as np
import PIL.Image
import PIL.ImageDraw
import pytest
import torch

from clipmesh import presets
from clipmesh.images import decode_image
from clipmesh.plan import num_latent_frames, split_clips
from clipmesh.v1 import clipmesh_pb2 as pb
from clipmesh.worker.noise import initial_noise
from conftest import planned, wait_until
from ranks import run_ranks, single_thread_model, solo_mesh

# the SDK warns that OpenAI's own video service is to shut down: this is clipmesh's
pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")

SIDE, STEPS, GUIDANCE, SEED, PROMPT = 64, 3, 5.0, 99, "a red circle moving right"
TOL = 1e-5
MODELS = ("tiny-wan-i2v", "tiny-wan22-i2v")


def png(colour=(220, 30, 30), size=(80, 48)) -> bytes:
    """A first frame that is not the video's size (the processor resizes it): a disc on blue."""
    image = PIL.Image.new("RGB", size, (20, 40, 200))
    PIL.ImageDraw.Draw(image).ellipse((10, 8, 34, 32), fill=colour)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


IMAGE = png()


def _request(model: str, world_size: int, strategy: str, frames: int, image: bytes = IMAGE) -> pb.SubmitJobRequest:
    return pb.SubmitJobRequest(prompt=PROMPT, negative_prompt="blurry", num_frames=frames, height=SIDE, width=SIDE,
                               num_inference_steps=STEPS, guidance_scale=GUIDANCE, seed=SEED, model=model,
                               strategy=strategy, num_workers=world_size, fps=8, image=image)


def _plan(model: str, world_size: int, strategy: str, frames: int = 17) -> pb.RenderPlan:
    req = _request(model, world_size, strategy, frames)
    if strategy == "block_pipeline":
        req.block_pipeline.CopyFrom(pb.BlockPipelineOptions(block_frames=2, context_frames=1))
    return planned(req, world_size, f"i2v-{model}-{strategy}-{world_size}-{frames}")


@pytest.fixture(scope="module")
def models():
    """Both presets loaded in this process with 1 thread, like the ranks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    from clipmesh.worker.adapters import load_adapter

    try:
        yield {name: load_adapter(presets.model_folder(name), "cpu", torch.float32) for name in MODELS}
    finally:
        torch.set_num_threads(threads)


_REFERENCES: dict = {}


def reference(models, name: str, frames: int = 17) -> torch.Tensor:
    """The stock WanImageToVideoPipeline from the same noise and image (computed once)."""
    if (name, frames) not in _REFERENCES:
        model = models[name]
        cond, uncond = model.encode_prompt(PROMPT, "blurry", GUIDANCE)
        noise = initial_noise(SEED, 0, num_latent_frames(frames, 4), 16, SIDE // 8, SIDE // 8)
        _REFERENCES[name, frames] = model.pipe(
            image=decode_image(IMAGE), prompt_embeds=cond, negative_prompt_embeds=uncond, latents=noise,
            height=SIDE, width=SIDE, num_frames=frames, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
            output_type="latent").frames
    return _REFERENCES[name, frames]


def _rank(mesh, name, strategy, frames):
    from clipmesh.worker.adapters import load_adapter
    from clipmesh.worker.render import denoise

    model = load_adapter(presets.model_folder(name), "cpu", torch.float32)
    return denoise(model, _plan(name, mesh.world_size, strategy, frames), mesh.rank, mesh).numpy()


def test_the_condition_of_any_clip_equals_the_whole_encode(models):
    """wan_encode.py: the encoder's receptive field R from its layout bounds the measured one
    (the first latent frame from which every later one is the same tensor, minus 1); the
    condition of any clip from the encoded head equals the clip of one `vae.encode` of the whole
    [image, zeros...]: 1, 2, 3 ranks' clips, uneven ones, one shorter than R and across it."""
    from clipmesh.worker.adapters.wan_encode import ConditionEncoder

    vae = models["tiny-wan-i2v"].pipe.vae
    encoder, latent = ConditionEncoder(vae), 41
    image = models["tiny-wan-i2v"].pipe.video_processor.preprocess(decode_image(IMAGE), height=SIDE, width=SIDE)
    with torch.no_grad():
        video = torch.cat([image.unsqueeze(2), image.new_zeros(1, 3, 4 * (latent - 1), SIDE, SIDE)], dim=2)
        whole = vae.encode(video).latent_dist.mode()
    same = [torch.equal(whole[:, :, s], whole[:, :, s + 1]) for s in range(latent - 1)]
    constant_from = next(s for s in range(latent) if all(same[s:]))
    print(f"receptive field: layout {encoder.receptive_field}, measured {constant_from - 1}")
    assert encoder.receptive_field >= constant_from - 1 > 0 and not same[constant_from - 2]
    head = encoder.encode_head(image, latent)
    assert head.shape[2] == encoder.receptive_field + 2 < latent
    splits = [split_clips(latent, n) for n in (1, 2, 3)] + [[(0, 2), (2, 23), (23, 41)], [(19, 23), (37, 41)]]
    for clips in splits:
        for start, end in clips:
            diff = (ConditionEncoder.clip(head, start, end) - whole[:, :, start:end]).abs().max().item()
            assert diff <= 1e-6, f"clip [{start}, {end}): {diff}"
    short = encoder.encode_head(image, 5)  # a video shorter than the head encodes only itself
    assert short.shape[2] == 5 and (short - whole[:, :, :5]).abs().max().item() <= 1e-6


@pytest.mark.parametrize("name", MODELS)
def test_one_worker_matches_the_stock_pipeline_and_reads_the_image(models, name):
    """In process (the runner's path): equal to the stock pipeline; another image gives another
    video, and so (Wan 2.1 I2V) does the CLIP embedding alone: neither input is ignored."""
    from clipmesh.worker.render import denoise

    model, expected = models[name], reference(models, name)
    with solo_mesh(f"i2v-one-{name}") as mesh:
        ours = denoise(model, _plan(name, 1, "exact"), 0, mesh)
        assert (ours - expected).abs().max().item() <= TOL
        plan = _plan(name, 1, "exact")
        plan.request.image = png(colour=(30, 220, 30))
        assert (denoise(model, plan, 0, mesh) - ours).abs().max().item() > 1e-3
        if name == "tiny-wan-i2v":
            encode = model.pipe.encode_image
            model.pipe.encode_image = lambda image, device: torch.zeros_like(encode(image, device))
            try:
                blind = denoise(model, _plan(name, 1, "exact"), 0, mesh)
            finally:
                model.pipe.encode_image = encode
            assert (blind - ours).abs().max().item() > 1e-3


CASES = [("tiny-wan-i2v", "exact", 2, 17), ("tiny-wan-i2v", "exact", 3, 17), ("tiny-wan-i2v", "ulysses", 2, 17),
         ("tiny-wan-i2v", "clip_parallel", 2, 17), ("tiny-wan-i2v", "clip_parallel", 3, 17),
         ("tiny-wan22-i2v", "exact", 3, 17), ("tiny-wan22-i2v", "ulysses", 2, 17),
         ("tiny-wan22-i2v", "clip_parallel", 2, 17),
         # 97 frames = 25 latent frames, past the encoded head of 22: rank 1's clip [13, 25) takes
         # the head's end and its constant tail
         ("tiny-wan-i2v", "exact", 2, 97)]


@pytest.mark.parametrize("name,strategy,world_size,frames", CASES)
def test_workers_match_the_stock_pipeline(models, name, strategy, world_size, frames):
    expected = reference(models, name, frames)
    results = run_ranks(_rank, world_size, name, strategy, frames, group=f"i2v-{name}-{strategy}-{world_size}")
    for rank, latents in sorted(results.items()):
        diff = (torch.from_numpy(latents) - expected).abs().max().item()
        print(f"{name} {strategy} world_size={world_size} frames={frames} rank={rank} max|diff|={diff:.3e}")
        assert diff <= TOL


def _blocks(mesh, name):
    """block_pipeline on 25 frames (blocks of 2 latent frames, 1 of context): the final latents."""
    from clipmesh.worker.adapters import load_adapter
    from clipmesh.worker.render import render

    model = load_adapter(presets.model_folder(name), "cpu", torch.float32)
    blocks = []
    render(model, _plan(name, mesh.world_size, "block_pipeline", 25), mesh.rank, mesh, decode=False,
           on_latents=lambda piece: blocks.append((piece.start, piece.latents.numpy().copy())))
    return blocks


def _video(blocks) -> torch.Tensor:
    return torch.cat([torch.from_numpy(x) for _, x in sorted(blocks, key=lambda b: b[0])], dim=2)


@pytest.mark.parametrize("name", MODELS)
def test_block_pipeline_stages_equal_one_stage(name):
    """Each block's embed takes its frames' image channels (context frames included), each stage's
    cross-attention the image embedding: 2 stages equal 1, and the image is read."""
    one = _video(run_ranks(_blocks, 1, name, group=f"i2v-bp1-{name}")[0])
    two = _video([b for blocks in run_ranks(_blocks, 2, name, group=f"i2v-bp2-{name}").values() for b in blocks])
    assert one.shape == two.shape and one.shape[2] == num_latent_frames(25, 4)
    diff = (two - one).abs().max().item()
    print(f"{name} block_pipeline 2 stages max|diff|={diff:.3e}")
    assert diff <= TOL


def test_images_and_modes_refused_at_submit():
    """Each a clear INVALID_ARGUMENT naming the field and the limit."""
    from clipmesh.coordinator.errors import InvalidArgument
    from clipmesh.coordinator.validate import validate_request
    from clipmesh.images import MAX_IMAGE_BYTES, MAX_IMAGE_SIDE

    i2v, t2v = (pb.ModelInfo(**presets.model_limits(n)) for n in ("tiny-wan-i2v", "tiny-wan"))
    assert list(i2v.modes) == ["i2v"] and list(t2v.modes) == ["t2v"]
    assert i2v.strategies == t2v.strategies  # every strategy runs image-to-video
    base = dict(prompt="p", num_frames=17, height=64, width=64, num_inference_steps=3, guidance_scale=5.0, fps=8)

    def refused(model, **fields) -> str:
        with pytest.raises(InvalidArgument) as err:
            validate_request(pb.SubmitJobRequest(model=model.name, **base, **fields), model, [model.name])
        assert err.value.field == "image"
        return str(err.value)

    assert "text-to-video model and takes no image" in refused(t2v, image=IMAGE)
    assert "needs a first-frame image" in refused(i2v)
    assert "not a decodable PNG or JPEG" in refused(i2v, image=IMAGE[:len(IMAGE) // 2])  # truncated
    assert "not a decodable PNG or JPEG" in refused(i2v, image=b"GIF89a not really")
    gif = io.BytesIO()
    PIL.Image.new("RGB", (4, 4)).save(gif, "GIF")
    assert "must be PNG or JPEG, got GIF" in refused(i2v, image=gif.getvalue())
    assert f"at most {MAX_IMAGE_BYTES} bytes" in refused(i2v, image=b"\x89PNG" + bytes(MAX_IMAGE_BYTES))
    assert f"sides must be in [1, {MAX_IMAGE_SIDE}]" in refused(i2v, image=png(size=(MAX_IMAGE_SIDE + 1, 2)))
    zero_area = bytearray(png(size=(3, 3)))
    zero_area[16:20] = bytes(4)  # IHDR width 0
    assert "image" in refused(i2v, image=bytes(zero_area))
    assert validate_request(pb.SubmitJobRequest(model=i2v.name, image=IMAGE, **base), i2v, [i2v.name]) == 5
    jpeg = io.BytesIO()
    decode_image(IMAGE).save(jpeg, "JPEG")
    assert validate_request(pb.SubmitJobRequest(model=i2v.name, image=jpeg.getvalue(), **base), i2v, [i2v.name]) == 5


def test_a_saved_folder_reports_its_modes():
    """A folder (not a preset name) is read from its model_index.json, as a real Wan2.1-I2V-14B-*-Diffusers is."""
    assert presets.model_limits(str(presets.model_folder("tiny-wan-i2v")))["modes"] == ["i2v"]
    assert presets.model_limits(str(presets.model_folder("tiny-wan22-i2v")))["experts"] == 2
    assert presets.model_limits(str(presets.model_folder("tiny-wan")))["modes"] == ["t2v"]


def test_image_to_video_through_real_daemons_cli_and_openai_sdk(daemons, tmp_path):
    """A coordinator (with the Videos API) and 2 workers serving tiny-wan-i2v: the openai SDK's
    input_reference upload makes a video of 2 workers; a bad image and a missing one are refused
    at submit (400 naming input_reference, INVALID_ARGUMENT naming image) with nothing queued."""
    import imageio.v3 as iio
    import openai

    from conftest import TOKEN

    port_file = tmp_path / "http.port"
    daemons.coordinator("--http", "127.0.0.1:0", "--http-port-file", str(port_file))
    for name in ("i0", "i1"):
        daemons.worker(name, "tiny-wan-i2v")
    wait_until(port_file.exists, 30, "the HTTP port", daemons)
    client = daemons.client()
    daemons.wait_idle(client, {"i0", "i1"})
    sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{port_file.read_text()}/v1", api_key=TOKEN, max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        sdk.videos.create(prompt="a cat", model="tiny-wan-i2v", size="64x64",
                          input_reference=("ref.png", IMAGE[:100], "image/png"))
    assert err.value.body["param"] == "input_reference" and "decodable" in err.value.body["message"]
    with pytest.raises(grpc.RpcError) as missing:
        client.submit("a cat", model="tiny-wan-i2v", num_frames=17, height=64, width=64)
    assert missing.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "image" in missing.value.details()
    assert client.jobs() == []

    video = sdk.videos.create(prompt="a red circle moving right", model="tiny-wan-i2v", size="64x64",
                              input_reference=("ref.png", IMAGE, "image/png"),
                              extra_body={"num_frames": 17, "steps": 2, "workers": 2, "fps": 8})
    wait_until(lambda: sdk.videos.retrieve(video.id).status in ("completed", "failed"), 120, "the video", daemons)
    done = client.get(video.id)
    assert done.state == pb.SUCCEEDED, done.error
    assert done.request.image == IMAGE and len(done.worker_ids) == 2
    assert [j.request.image for j in client.jobs()] == [b""]  # a listing leaves the image out
    assert iio.imread(sdk.videos.download_content(video.id).read(), extension=".mp4").shape == (17, 64, 64, 3)

    # JSON callers send the image as a base64 data: URL; a URL to fetch is refused, naming the field
    def post(reference: str) -> tuple[int, dict]:
        body = json.dumps({"prompt": "a cat", "model": "tiny-wan-i2v", "size": "64x64", "num_frames": 5, "steps": 1,
                           "input_reference": reference}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port_file.read_text()}/v1/videos", data=body, headers={
            "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    status, created = post("data:image/png;base64," + base64.b64encode(IMAGE).decode())
    assert status == 200 and client.get(created["id"]).request.image == IMAGE
    for reference in ("https://example.com/first.png", "data:image/png;base64,@@@"):
        status, error = post(reference)
        assert status == 400 and error["error"]["param"] == "input_reference", reference


def test_generate_with_an_image(tmp_path):
    """`clipmesh generate --image` on 2 local workers; an unreadable --image is one line."""
    import imageio.v3 as iio

    from test_generate import processes_marked, run_cli

    (tmp_path / "first.png").write_bytes(IMAGE)
    out = tmp_path / "v.mp4"
    common = ["--model", "tiny-wan-i2v", "--frames", "17", "--workers", "2", "--height", "64", "--width", "64",
              "--steps", "2", "--output", str(out)]
    proc = run_cli(["generate", "a red circle", "--image", str(tmp_path / "nope.png"), *common,
                    "--keep-data", str(tmp_path / "d0")], tmp_path, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--image: cannot read" in proc.stderr
    proc = run_cli(["generate", "a red circle", "--image", str(tmp_path / "first.png"), *common,
                    "--keep-data", str(tmp_path / "d1")], tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert iio.imread(out).shape == (17, 64, 64, 3)
    assert processes_marked(tmp_path) == []
