"""`clip_parallel` on the UNet3D family (tiny-unet3d): Video-Infinity's original setting.

One worker equals the whole UNet run in one process with the dense dual-scope reference
(tests/test_clip_parallel_wan.py) as every temporal attention (S = 1, no positions; temporal
convs and GroupNorms are the single device's own there); 2 and 3 workers (uneven: a middle
clip shorter than the halo, then a first one) equal one worker. Entropy scaling on (native 16
frames from the preset's ModelInfo); DDIM's 3 steps (t = 667 | 334, 1) straddle the phase
switch at 500. And a window covering the video (P >= F, G = 0, no entropy scaling) on 3
workers is the stock TextToVideoSDPipeline.
"""

from __future__ import annotations


import pytest
import torch

from clipmesh.plan import global_frame_indices
from clipmesh.v1 import clipmesh_pb2 as pb
from clipmesh.worker.noise import initial_noise
from ranks import run_ranks, single_thread_model, solo_mesh
from test_clip_parallel_wan import dense_dual_scope, hand_plan

FRAMES, SIDE, STEPS, GUIDANCE, SEED = 9, 64, 3, 9.0, 4321
LATENT = FRAMES  # no temporal compression
HALO, GLOBAL, SWITCH, BIAS, NATIVE = 2, 3, 500.0, 10.0, 16
GLOBAL_PHASE = 0.34  # 1 of DDIM's 3 steps (t = 667): t >= SWITCH in the dense reference
SPLITS = {1: [(0, 9)], 2: [(0, 5), (5, 9)], 3: [(0, 3), (3, 4), (4, 9)], "3-short-first": [(0, 1), (1, 5), (5, 9)]}
TOL = 1e-5


def plan_for(case, halo=None, num_global=None, entropy=True):
    clips = SPLITS[case]
    req = pb.SubmitJobRequest(prompt="a lighthouse at dusk", negative_prompt="blurry", num_frames=FRAMES,
                              height=SIDE, width=SIDE, num_inference_steps=STEPS, guidance_scale=GUIDANCE, seed=SEED,
                              model="tiny-unet3d", strategy="clip_parallel", num_workers=len(clips))
    return hand_plan(clips, HALO if halo is None else halo, GLOBAL if num_global is None else num_global, GLOBAL_PHASE, BIAS,
                     entropy=entropy, request=req, name="cpu3d")


@pytest.fixture(scope="module")
def folder():
    from clipmesh.presets import model_folder
    return model_folder("tiny-unet3d")


@pytest.fixture(scope="module")
def model(folder):
    yield from single_thread_model(folder)


class DenseTemporalAttention:
    def __init__(self, state):
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        assert encoder_hidden_states is None and attention_mask is None and hidden_states.shape[1] == LATENT
        residual = hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        rows = hidden_states.shape[0]
        q, k, v = (t.reshape(rows, LATENT, 1, attn.heads, -1) for t in (q, k, v))
        assert attn.scale == q.shape[-1] ** -0.5  # the reference's scale
        out = dense_dual_scope(q, k, v, HALO, global_frame_indices(LATENT, GLOBAL), self.state["t"], SWITCH, BIAS,
                               True, NATIVE)
        out = attn.to_out[1](attn.to_out[0](out.reshape(rows, LATENT, -1).to(hidden_states.dtype)))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@torch.no_grad()
def _dense_run(model):
    req = plan_for(1).request
    cond, uncond = model.encode_prompt(req.prompt, req.negative_prompt, req.guidance_scale)
    state = {"t": None}
    hook = model.denoiser.register_forward_pre_hook(lambda mod, args: state.update(t=float(args[1])))
    attns = model.temporal_attentions()
    stock = [a.processor for a in attns]
    try:
        for a in attns:
            a.set_processor(DenseTemporalAttention(state))
        return model.pipe(prompt_embeds=cond, negative_prompt_embeds=uncond,
                          latents=initial_noise(SEED, 0, LATENT, 4, SIDE // 8, SIDE // 8), height=SIDE, width=SIDE,
                          num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                          output_type="latent").frames
    finally:
        hook.remove()
        for a, p in zip(attns, stock):
            a.set_processor(p)


@pytest.fixture(scope="module")
def one_worker(model):
    from clipmesh.worker.render import denoise
    with solo_mesh("cpu3d-1") as mesh:
        return denoise(model, plan_for(1), 0, mesh)


def test_one_worker_equals_dense_reference(model, one_worker):
    stock = [a.processor for a in model.temporal_attentions()]
    want = _dense_run(model)
    diff = (one_worker - want).abs().max().item()
    print(f"unet3d clip_parallel 1 worker vs dense reference: max|diff|={diff:.3e}")
    assert diff <= TOL
    assert [a.processor for a in model.temporal_attentions()] == stock  # removed again
    assert all("forward" not in m.__dict__ for m in model.temporal_convs() + model.frame_norms())


def _rank_main(mesh, plan_bytes, folder):
    from clipmesh.worker.adapters import load_adapter
    from clipmesh.worker.render import denoise
    model, plan = load_adapter(folder, "cpu", torch.float32), pb.RenderPlan.FromString(plan_bytes)
    return denoise(model, plan, mesh.rank, mesh).numpy()


def _run_ranks(plan, folder) -> dict:
    """Every rank of `plan` in its own process; rank -> the whole video's final latents."""
    return run_ranks(_rank_main, plan.world_size, plan.SerializeToString(), str(folder), group=plan.group_name)


@pytest.mark.parametrize("case", [2, 3, "3-short-first"])
def test_workers_equal_one_worker(case, folder, one_worker):
    for rank, latents in sorted(_run_ranks(plan_for(case), folder).items()):
        diff = (torch.from_numpy(latents) - one_worker).abs().max().item()
        print(f"unet3d clips={SPLITS[case]} rank={rank} max|diff|={diff:.3e}")
        assert diff <= TOL


def test_window_covering_the_video_is_vanilla(folder, model, one_worker):
    """P >= F and G = 0: every query frame sees every frame, once; the phase bias then shifts
    a whole row of logits (softmax ignores it) and entropy scaling is off, so each temporal
    attention is the model's own. On 3 workers whose halos span every rank (a 1-frame first
    clip), clip_parallel is the stock pipeline; the dual scope of the other tests is not."""
    req = plan_for(1).request
    cond, uncond = model.encode_prompt(req.prompt, req.negative_prompt, req.guidance_scale)
    with torch.no_grad():
        want = model.pipe(prompt_embeds=cond, negative_prompt_embeds=uncond,
                          latents=initial_noise(SEED, 0, LATENT, 4, SIDE // 8, SIDE // 8), height=SIDE, width=SIDE,
                          num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                          output_type="latent").frames
    plan = plan_for("3-short-first", halo=LATENT, num_global=0, entropy=False)
    for rank, latents in sorted(_run_ranks(plan, folder).items()):
        diff = (torch.from_numpy(latents) - want).abs().max().item()
        print(f"unet3d P={LATENT} G=0 clips={SPLITS['3-short-first']} rank={rank} vs TextToVideoSDPipeline: "
              f"max|diff|={diff:.3e}")
        assert diff <= TOL
    dual = (one_worker - want).abs().max().item()
    print(f"  (P={HALO} G={GLOBAL} vs the pipeline: {dual:.3e})")
    assert dual > 100 * TOL
