"""block_pipeline (DualParal) against independent references, on tiny-wan (4 transformer blocks).

- A 1-process block-wise reference written here: the same queue, context, feature cache and
  noise, but no pipeline: every iteration runs the stock WanTransformer3DModel.forward on each
  queued block (two calls for CFG, as WanPipeline does) and then steps all of them at once. The
  1-stage run equals it, and 2-, 3- and 4-stage pipelines (uneven layer splits 2+1+1) equal the
  1-stage run.
- With context_frames = 0 and one block covering the whole video, the result is vanilla
  WanPipeline from the same noise.
- The streamed frames are exactly the frames of the video: block after block through the
  streaming decoder equals decoding the whole video at once, with exactly num_frames frames.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipmesh import presets
from clipmesh.plan import num_latent_frames
from clipmesh.v1 import clipmesh_pb2 as pb
from clipmesh.worker.noise import coordinated_noise
from conftest import planned
from ranks import run_ranks, single_thread_model, solo_mesh

SIDE, STEPS, GUIDANCE, SEED = 32, 3, 5.0, 99
TOL = 1e-5


def _plan(world_size: int, frames: int, block: int, context: int, steps: int = STEPS) -> pb.RenderPlan:
    req = pb.SubmitJobRequest(prompt="a river in spring", negative_prompt="blurry", num_frames=frames, height=SIDE,
                              width=SIDE, num_inference_steps=steps, guidance_scale=GUIDANCE, seed=SEED,
                              model="tiny-wan", strategy="block_pipeline", fps=8,
                              block_pipeline=pb.BlockPipelineOptions(block_frames=block, context_frames=context))
    return planned(req, world_size, f"bp{world_size}")


@pytest.fixture(scope="module")
def folder():
    return str(presets.model_folder("tiny-wan"))


@pytest.fixture(scope="module")
def model(folder):
    yield from single_thread_model(folder)


def _run(mesh, folder, plan_bytes):
    """One rank of the pipeline; rank 0 returns the blocks it finished, in order."""
    from clipmesh.worker.adapters import load_adapter
    from clipmesh.worker.render import render

    plan = pb.RenderPlan.FromString(plan_bytes)
    model = load_adapter(folder, "cpu", torch.float32)
    blocks = []
    render(model, plan, mesh.rank, mesh, decode=False,
           on_latents=lambda piece: blocks.append((piece.start, piece.end, piece.latents.numpy().copy())))
    return blocks


def _pipeline(folder, plan, by_rank=None) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """The finished blocks of every rank (`by_rank`: of a run already made), in video order: runs
    of DECODE_RUN blocks are handed to the ranks in turn to decode."""
    from clipmesh.specs import DECODE_RUN

    by_rank = by_rank or run_ranks(_run, plan.world_size, folder, plan.SerializeToString(),
                                   group=f"bp-{plan.world_size}-{plan.request.num_frames}")
    for rank, blocks in by_rank.items():
        runs = [s // plan.block_pipeline.block_frames // DECODE_RUN % plan.world_size for s, _, _ in blocks]
        assert runs == [rank] * len(blocks)
    blocks = sorted(b for rank_blocks in by_rank.values() for b in rank_blocks)
    return [(s, e) for s, e, _ in blocks], torch.cat([torch.from_numpy(x) for _, _, x in blocks], dim=2)


# -- the reference, written from docs/algorithms.md section 2 ------------------------------------

def _rotate(x, cos, sin):
    """Wan's RoPE: interleaved pairs (x0, x1) rotated by the frequency of their position."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)


class _CachedSelfAttention:
    """Reference feature cache for one attn1: raw K/V of the first `context` own frames of the
    block run last (per CFG branch) are appended to the next block's keys, after its frames."""

    def __init__(self, state, rope):
        self.state, self.rope, self.kv = state, rope, {}

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        st = self.state
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        n = st["tokens_per_frame"]
        first = slice(st["context_in"] * n, (st["context_in"] + st["c"]) * n)
        if self.kv.get("iteration") != st["iteration"]:  # caches never cross iterations
            self.kv = {"iteration": st["iteration"]}
        cached = self.kv.get(st["branch"])
        self.kv[st["branch"]] = (k[:, first], v[:, first])
        if cached is not None:
            k, v = torch.cat([k, cached[0]], 1), torch.cat([v, cached[1]], 1)
        q, k = attn.norm_q(q), attn.norm_k(k)
        b, heads = q.shape[0], attn.heads
        q, k, v = (x.view(b, x.shape[1], heads, -1) for x in (q, k, v))
        cos_q, sin_q = self.rope(q.shape[1] // n)
        cos_k, sin_k = self.rope(k.shape[1] // n)
        q, k = _rotate(q, cos_q, sin_q), _rotate(k, cos_k, sin_k)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2)
        return attn.to_out[1](attn.to_out[0](out))


@torch.no_grad()
def _reference(model, plan) -> torch.Tensor:
    """Synchronous block queue on the stock transformer: all queued blocks predict from the
    latents at the start of the iteration, then all step."""
    req, opts = plan.request, plan.block_pipeline
    b, c, steps = opts.block_frames, opts.context_frames, req.num_inference_steps
    transformer = model.pipe.transformer
    channels, h, w = model.latent_shape(SIDE, SIDE)
    total = num_latent_frames(req.num_frames, 4)
    spans = [(s, min(s + b, total)) for s in range(0, total, b)]
    draws = coordinated_noise(SEED, b, c, channels, h, w)
    cond, uncond = model.encode_prompt(req.prompt, req.negative_prompt, GUIDANCE)
    state = dict(c=c, tokens_per_frame=(h // 2) * (w // 2), iteration=-1)

    def rope(frames):
        return transformer.rope(torch.zeros(1, channels, frames, h, w))

    stock = {i: blk.attn1.processor for i, blk in enumerate(transformer.blocks)}
    for blk in transformer.blocks:
        blk.attn1.set_processor(_CachedSelfAttention(state, rope))
    latents, schedulers = {}, {}
    try:
        for k in range(len(spans) + steps - 1):
            if k < len(spans):
                schedulers[k] = model.new_scheduler()
                schedulers[k].set_timesteps(steps)
                latents[k] = next(draws)[:, :, : spans[k][1] - spans[k][0]]
            state["iteration"] = k
            queued = [j for j in range(len(spans)) if 0 <= k - j < steps]
            preds = {}
            for j in sorted(queued, reverse=True):  # tail -> head
                t = schedulers[j].timesteps[k - j]
                context = latents[j - 1][:, :, latents[j - 1].shape[2] - c:] if j > 0 else latents[j][:, :, :0]
                x = torch.cat([context, latents[j]], dim=2)
                state["context_in"] = context.shape[2]
                outs = []
                for state["branch"], text in (("cond", cond), ("uncond", uncond)):
                    outs.append(transformer(hidden_states=x, timestep=t.expand(1), encoder_hidden_states=text,
                                            return_dict=False)[0][:, :, context.shape[2]:])
                preds[j] = outs[1] + GUIDANCE * (outs[0] - outs[1])
            for j in queued:
                latents[j] = schedulers[j].step(preds[j], schedulers[j].timesteps[k - j], latents[j],
                                                return_dict=False)[0]
    finally:
        for i, blk in enumerate(transformer.blocks):
            blk.attn1.set_processor(stock[i])
    return torch.cat([latents[j] for j in range(len(spans))], dim=2)


# 41 frames = 11 latent frames: blocks of 3 -> 3+3+3+2 (a short last block), context 2
FRAMES, BLOCK, CONTEXT = 41, 3, 2


@pytest.fixture(scope="module")
def one_stage(folder):
    return _pipeline(folder, _plan(1, FRAMES, BLOCK, CONTEXT))


def test_one_stage_equals_the_blockwise_reference(model, one_stage):
    spans, latents = one_stage
    assert spans == [(0, 3), (3, 6), (6, 9), (9, 11)]  # blocks leave in order, the last one short
    ref = _reference(model, _plan(1, FRAMES, BLOCK, CONTEXT))
    assert latents.shape == ref.shape == (1, 16, 11, SIDE // 8, SIDE // 8)
    assert (latents - ref).abs().max().item() <= TOL


def test_reference_sees_the_context_and_the_cache(model, one_stage):
    """Guard against a vacuous oracle: without context and cache the video is different."""
    _, latents = one_stage
    independent = _reference(model, _plan(1, FRAMES, BLOCK, 0))
    assert (latents - independent).abs().max().item() > 1e-2


@pytest.mark.parametrize("world_size", [2, 3])  # 4 (one layer a stage) left out: the suite's time budget
def test_stage_pipelines_equal_one_stage(folder, one_stage, world_size):
    plan = _plan(world_size, FRAMES, BLOCK, CONTEXT)
    assert [r.end - r.start for r in plan.layers] == {2: [2, 2], 3: [2, 1, 1], 4: [1, 1, 1, 1]}[world_size]
    spans, latents = _pipeline(folder, plan)
    assert spans == one_stage[0]
    assert (latents - one_stage[1]).abs().max().item() <= TOL


def test_every_rank_decodes_its_runs_of_blocks(folder):
    """9 blocks on 2 stages: runs of 4 blocks go to rank 0, 1, 0 (the decode is spread, rank 0 is
    not the only one decoding), and the blocks are those of the 1-stage run."""
    plans = [_plan(n, 65, 2, 1, steps=1) for n in (1, 2)]
    by_rank = run_ranks(_run, 2, folder, plans[1].SerializeToString(), group="bp-runs")
    assert [s for s, _, _ in by_rank[0]] == [0, 2, 4, 6, 16] and [s for s, _, _ in by_rank[1]] == [8, 10, 12, 14]
    one_spans, one = _pipeline(folder, plans[0])
    spans, two = _pipeline(folder, plans[1], by_rank)  # the same 2-stage run, not a second one
    assert spans == one_spans and (two - one).abs().max().item() <= TOL


def test_one_block_without_context_is_vanilla_wan(model, folder):
    """context 0 and one block of the whole video: WanPipeline from the block's noise."""
    frames = 17  # 5 latent frames in one block of 5
    plan = _plan(1, frames, 5, 0)
    _, latents = _pipeline(folder, plan)
    req = plan.request
    noise = next(coordinated_noise(SEED, 5, 0, 16, SIDE // 8, SIDE // 8))
    cond, uncond = model.encode_prompt(req.prompt, req.negative_prompt, GUIDANCE)
    vanilla = model.pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=noise, height=SIDE, width=SIDE,
                         num_frames=frames, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                         output_type="latent").frames
    assert (latents - vanilla).abs().max().item() <= TOL


def test_coordinated_noise_reuses_the_pool_without_the_previous_tail():
    b, c = 4, 2
    pool = next(coordinated_noise(SEED, b + c, 0, 2, 2, 2))  # with c = 0 the first draw is a permutation of the pool
    draws = coordinated_noise(SEED, b, c, 2, 2, 2)
    blocks = [next(draws) for _ in range(6)]
    again = coordinated_noise(SEED, b, c, 2, 2, 2)
    assert all(torch.equal(x, next(again)) for x in blocks)  # a pure function of the seed

    def pool_index(frame):
        (match,) = [i for i in range(b + c) if torch.equal(pool[:, :, i], frame)]
        return match

    indices = [[pool_index(blk[:, :, f]) for f in range(b)] for blk in blocks]
    for previous, current in zip(indices, indices[1:]):
        assert len(set(current)) == b                       # a permutation: no frame twice
        assert not set(previous[-c:]) & set(current)        # the previous block's tail is not reused
    assert len({tuple(i) for i in indices}) > 1             # the order changes from block to block


@pytest.mark.parametrize("frames,block", [(1, 2), (13, 2), (29, 3), (45, 4)])
def test_streamed_frames_are_the_whole_video(model, frames, block):
    """Exactly num_frames frames, in order, equal to decoding the whole latent video at once."""
    from clipmesh.worker.render import render

    plan = _plan(1, frames, block, min(1, block), steps=1)
    pieces, blocks = [], []
    with solo_mesh(f"stream-{frames}") as mesh:
        render(model, plan, 0, mesh, on_frames=pieces.append, on_latents=lambda piece: blocks.append(piece.latents))
    assert [p.first_frame for p in pieces] == [0] + [sum(len(p.frames) for p in pieces[:i]) for i in range(1, len(pieces))]
    streamed = torch.from_numpy(np.concatenate([p.frames for p in pieces]))
    assert streamed.shape[0] == frames
    whole = torch.from_numpy(model.decode(torch.cat(blocks, dim=2)))
    assert torch.equal(streamed, whole)


@pytest.mark.parametrize("stopped", [False, True])
def test_a_stopped_job_drops_the_blocks_still_waiting_to_be_decoded(model, stopped):
    """The decode thread holds one block (its frames' hand-off waits) while two more wait in its
    queue. finish() decodes all three; finish(abandon=True) (the job stopped: the coordinator
    refuses the attempt's later frames) ends after the block in hand and drops the two, so a
    cancelled endless job frees its workers at once instead of decoding a backlog nobody keeps."""
    import threading

    from clipmesh.worker.job import FinishedLatents, Job
    from clipmesh.worker.render import Decoder

    plan = _plan(1, 13, 1, 0, steps=1)
    channels, h, w = model.latent_shape(SIDE, SIDE)
    latents = torch.randn(1, channels, 4, h, w, generator=torch.Generator().manual_seed(0))
    entered, gate, firsts = threading.Event(), threading.Event(), []

    def on_frames(piece):
        firsts.append(piece.first_frame)
        entered.set()
        assert gate.wait(30)

    with solo_mesh(f"abandon-{stopped}") as mesh:
        decoder = Decoder(Job(model, plan, 0, mesh), on_frames, background=True)
        decoder.add(FinishedLatents(0, 2, latents[:, :, :2]))
        assert entered.wait(30)                       # the first block is in the thread's hands
        decoder.add(FinishedLatents(2, 3, latents[:, :, 2:3]))
        decoder.add(FinishedLatents(3, 4, latents[:, :, 3:4]))
        ending = threading.Thread(target=decoder.finish, kwargs=dict(abandon=stopped))
        ending.start()
        if stopped:                                   # whatever the thread takes next, it must drop
            while not decoder.abandoned:
                time.sleep(0.01)
        gate.set()
        ending.join(30)
    assert not ending.is_alive()
    # the first block's frames, then (finish only) one piece per latent frame of the other two
    assert firsts == ([0] if stopped else [0, 5, 9]), firsts
