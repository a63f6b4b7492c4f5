"""Wan 2.2 TI2V-5B's layout (tiny-wan-ti2v: a WanPipeline folder with expand_timesteps, the
z_dim-48 residual VAE with 2x2 patches, a 48-channel transformer): text-to-video and
image-to-video from the same folder, per-token timesteps under every strategy.

The oracle is diffusers' own pipelines from the same noise: WanPipeline for text-to-video, and
WanImageToVideoPipeline built on the same components (expand_timesteps=True) for image-to-video,
where latent frame 0 is held at the image's latents and its tokens run at timestep 0.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipmesh import presets
from clipmesh.images import decode_image
from clipmesh.plan import num_latent_frames
from clipmesh.v1 import clipmesh_pb2 as pb
from clipmesh.worker.noise import initial_noise
from conftest import planned
from ranks import run_ranks, single_thread_model, solo_mesh
from test_wan_i2v import IMAGE, png

NAME, SIDE, STEPS, GUIDANCE, SEED, PROMPT = "tiny-wan-ti2v", 64, 3, 5.0, 11, "a red circle moving right"
TOL = 1e-5


def _plan(world_size: int, strategy: str, image: bytes, frames: int = 17) -> pb.RenderPlan:
    req = pb.SubmitJobRequest(prompt=PROMPT, negative_prompt="blurry", num_frames=frames, height=SIDE, width=SIDE,
                              num_inference_steps=STEPS, guidance_scale=GUIDANCE, seed=SEED, model=NAME,
                              strategy=strategy, num_workers=world_size, fps=8, image=image)
    if strategy == "block_pipeline":
        req.block_pipeline.CopyFrom(pb.BlockPipelineOptions(block_frames=2, context_frames=1))
    return planned(req, world_size, f"ti2v-{strategy}-{world_size}")


@pytest.fixture(scope="module")
def model():
    yield from single_thread_model(presets.model_folder(NAME))


_REFERENCES: dict = {}


def reference(model, image: bytes) -> torch.Tensor:
    if image not in _REFERENCES:
        from diffusers import WanImageToVideoPipeline

        cond, uncond = model.encode_prompt(PROMPT, "blurry", GUIDANCE)
        noise = initial_noise(SEED, 0, num_latent_frames(17, 4), 48, SIDE // 16, SIDE // 16)
        args = dict(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=noise, height=SIDE, width=SIDE,
                    num_frames=17, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent")
        p = model.pipe
        if image:
            i2v = WanImageToVideoPipeline(tokenizer=p.tokenizer, text_encoder=p.text_encoder, vae=p.vae,
                                          scheduler=p.scheduler, transformer=p.transformer, expand_timesteps=True)
            i2v.set_progress_bar_config(disable=True)
            _REFERENCES[image] = i2v(image=decode_image(image), **args).frames
        else:
            _REFERENCES[image] = p(**args).frames
    return _REFERENCES[image]


def _rank(mesh, strategy, image):
    from clipmesh.worker.adapters import load_adapter
    from clipmesh.worker.render import denoise

    model = load_adapter(presets.model_folder(NAME), "cpu", torch.float32)
    return denoise(model, _plan(mesh.world_size, strategy, image), mesh.rank, mesh).numpy()


def test_a_ti2v_folder_takes_text_and_image():
    limits = presets.model_limits(str(presets.model_folder(NAME)))
    assert limits["modes"] == ["t2v", "i2v"] and limits["native_latent_frames"] == 31
    assert limits["spatial_multiple"] == 32  # x16 VAE, 2x2 transformer patches


@pytest.mark.parametrize("image", [b"", IMAGE], ids=["t2v", "i2v"])
def test_one_worker_matches_the_stock_pipelines(model, image):
    """In process; with an image, the first latent frame is the image's (held in and out), so
    another image changes the video, and the video's first frame is the image as the VAE
    reproduces it."""
    from clipmesh.worker.render import denoise

    expected = reference(model, image)
    with solo_mesh("ti2v-one") as mesh:
        ours = denoise(model, _plan(1, "exact", image), 0, mesh)
        assert (ours - expected).abs().max().item() <= TOL
        if image:
            other = _plan(1, "exact", image)
            other.request.image = png(colour=(30, 220, 30))
            assert (denoise(model, other, 0, mesh) - ours).abs().max().item() > 1e-3
            held = model.image_condition(decode_image(image), SIDE, SIDE).part(0, 1).first_frame
            assert torch.equal(ours[:, :, :1], held)


CASES = [("t2v", "exact", 3), ("t2v", "clip_parallel", 2), ("i2v", "exact", 2), ("i2v", "ulysses", 2),
         ("i2v", "clip_parallel", 3)]


@pytest.mark.parametrize("mode,strategy,world_size", CASES)
def test_workers_match_the_stock_pipelines(model, mode, strategy, world_size):
    """Per-token timesteps for each rank's own tokens (0 on the held first frame, rank 0's)."""
    image = IMAGE if mode == "i2v" else b""
    expected = reference(model, image)
    results = run_ranks(_rank, world_size, strategy, image, group=f"ti2v-{mode}-{strategy}-{world_size}")
    for rank, latents in sorted(results.items()):
        diff = (torch.from_numpy(latents) - expected).abs().max().item()
        print(f"ti2v {mode} {strategy} world_size={world_size} rank={rank} max|diff|={diff:.3e}")
        assert diff <= TOL


def _render(mesh, strategy, image, frames):
    """Final latents and decoded frames of this rank."""
    from clipmesh.worker.adapters import load_adapter
    from clipmesh.worker.render import render

    model = load_adapter(presets.model_folder(NAME), "cpu", torch.float32)
    latents, video = [], []
    render(model, _plan(mesh.world_size, strategy, image, frames), mesh.rank, mesh,
           on_latents=lambda piece: latents.append((piece.start, piece.latents.numpy().copy())),
           on_frames=lambda rendered: video.append((rendered.first_frame, rendered.frames)))
    return latents, video


def _whole(parts) -> np.ndarray:
    return np.concatenate([x for _, x in sorted(parts, key=lambda p: p[0])], axis=2 if parts[0][1].ndim == 5 else 0)


def test_block_pipeline_stages_equal_one_stage_and_every_rank_decodes_exactly(model):
    """block_pipeline (per-token timesteps per item, block 0 holding the image) on 2 stages equals
    1 stage, latents and frames; the frames of exact on 2 ranks (each decoding its own clip
    through the residual VAE from a warm-up) are those of one decode of the whole video."""
    one = run_ranks(_render, 1, "block_pipeline", IMAGE, 25, group="ti2v-bp1")[0]
    two = run_ranks(_render, 2, "block_pipeline", IMAGE, 25, group="ti2v-bp2")
    latents = _whole([p for rank in two.values() for p in rank[0]])
    assert latents.shape == _whole(one[0]).shape == (1, 48, 7, SIDE // 16, SIDE // 16)
    assert np.abs(latents - _whole(one[0])).max() <= TOL
    assert np.array_equal(_whole([p for rank in two.values() for p in rank[1]]), _whole(one[1]))

    ranks = run_ranks(_render, 2, "exact", b"", 33, group="ti2v-decode")
    latents = torch.from_numpy(_whole([p for rank in ranks.values() for p in rank[0]]))
    frames = _whole([p for rank in ranks.values() for p in rank[1]])
    assert frames.shape == (33, SIDE, SIDE, 3)
    assert np.array_equal(frames, model.decode(latents))
