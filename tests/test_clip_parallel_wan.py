"""The oracle for `clip_parallel` (Video-Infinity dual-scope attention) on Wan.

1. DualScope.attend on N real gloo ranks (uneven splits, clips shorter than the halo, both
   phases, G=0 and G>=F, entropy on/off, chunked, a rekey, spectral blend on/off) equals a dense
   masked reference written here: the full score matrix of every query token over all F frames'
   tokens plus the G global frames' tokens, window+global mask, phase bias, one softmax; with the
   spectral blend, also the window-only softmax, the two blended by an explicit DFT matrix.
2. tiny-wan end to end: one worker equals the whole model run with that dense reference as its
   self-attention (for every global RoPE policy, the plan's global_rope; and with the spectral
   blend), and 2 and 3 workers (uneven, one clip shorter than the halo) equal one worker; the
   3 steps straddle the phase switch (t = 999, 857 | 600).
3. Mesh.exchange_halos (multi-hop, sizes learned or given) and take_stats byte counts.
4. global_frame_indices: count, order, range, uniform spread, independence of the split.
"""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch

from clipmesh.plan import global_frame_indices, num_latent_frames
from clipmesh.specs import GLOBAL_ROPE_POLICIES, STRATEGY_SPECS
from clipmesh.v1 import clipmesh_pb2 as pb
from clipmesh.worker.noise import initial_noise
from ranks import run_ranks, single_thread_model

TOL = 1e-5
NATIVE = 4  # native frames for entropy scaling in the core cases (any value > 1/S works)


def hand_plan(clips, halo, num_global, global_phase=0.6, bias=10.0, entropy=False, request=None, name="cp",
              noise_reschedule=False, spectral_blend=False, global_rope="native"):
    """A plan written by hand, not by the planner: the worker's dual-scope attention must be right on
    any split check_plan accepts, including those the planner never makes (a clip shorter than the
    halo, a short first clip), and at options set one by one against the dense reference."""
    opts = pb.ClipParallelOptions(local_halo=halo, global_frames=num_global, global_phase=global_phase,
                                  noise_reschedule=noise_reschedule, spectral_blend=spectral_blend,
                                  global_rope=global_rope, phase_bias=bias, entropy_scaling=entropy)
    return pb.RenderPlan(request=request, strategy="clip_parallel", world_size=len(clips),
                         num_latent_frames=clips[-1][1], clips=[pb.ClipRange(start=s, end=e) for s, e in clips],
                         start_step=0, group_name=f"{name}-{len(clips)}", timeout_seconds=60,
                         clip_parallel=opts)


# ---------------------------------------------------------------------------------------------
# the dense reference
# ---------------------------------------------------------------------------------------------

def dense_dual_scope(q, k, v, halo, gidx, t, switch, bias, entropy, native_frames, gk_per_query=None,
                     spectral_blend=False):
    """q, k, v [B, F, S, H, D] of the whole video -> [B, F, S, H, D], in float64.

    gk_per_query [B, F, G, S, H, D]: the global keys each query frame sees (default: k[:, gidx]).
    spectral_blend: FreeLong's blend of this (the global branch) with the window-only softmax of
    the same logits (the local branch): the global branch's low temporal frequencies, the local
    one's high, over the whole video's frames."""
    q, k, v = q.double(), k.double(), v.double()
    b, f, s, h, d = q.shape
    g = len(gidx)
    gk = k[:, gidx].unsqueeze(1).expand(b, f, g, s, h, d) if gk_per_query is None else gk_per_query.double()
    gv = v[:, gidx]                                                                # [B, G, S, H, D]
    local = torch.einsum("bfshd,bjthd->bhfsjt", q, k).reshape(b, h, f, s, f * s)
    glob = torch.einsum("bfshd,bfgthd->bhfsgt", q, gk).reshape(b, h, f, s, g * s)
    # the window: 2*halo+1 frames around the query, slid inward (not clipped) at the video's ends
    width = min(2 * halo + 1, f)
    first = (torch.arange(f) - halo).clamp(min=0, max=f - width)
    frame = torch.arange(f)
    in_window = (frame[None, :] >= first[:, None]) & (frame[None, :] < first[:, None] + width)   # [F, F]
    global_seen = ~in_window[:, gidx] if g else torch.zeros(f, 0, dtype=torch.bool)  # a global the window holds: not again
    assert (in_window.sum(1) == width).all()
    visible = (in_window.sum(1) + global_seen.sum(1)) * s                          # tokens each query sees
    scale = torch.full((f,), 1 / math.sqrt(d), dtype=torch.float64)
    if entropy:
        scale = scale * (torch.log(visible.double()) / math.log(native_frames * s)).clamp(min=1)
    local_bias, global_bias = (0.0, bias) if t >= switch else (bias, 0.0)
    local = local * scale.view(1, 1, f, 1, 1) + local_bias
    local = local.masked_fill(~in_window.repeat_interleave(s, 1).view(1, 1, f, 1, f * s), float("-inf"))
    glob = glob * scale.view(1, 1, f, 1, 1) + global_bias
    glob = glob.masked_fill(~global_seen.repeat_interleave(s, 1).view(1, 1, f, 1, g * s), float("-inf"))
    p = torch.softmax(torch.cat([local, glob], dim=-1), dim=-1)                    # one softmax
    values = torch.cat([v.reshape(b, f * s, h, d), gv.reshape(b, g * s, h, d)], dim=1)
    out = torch.einsum("bhfsk,bkhd->bfshd", p, values)
    if not spectral_blend:
        return out
    window_only = torch.einsum("bhfsk,bkhd->bfshd", torch.softmax(local, dim=-1), v.reshape(b, f * s, h, d))
    return spectral_blend_reference(out, window_only, halo)


def spectral_blend_reference(global_branch, local_branch, halo):
    """[B, F, ...] x 2 -> the low temporal frequencies of the first plus the high ones of the second,
    by an explicit F x F DFT matrix; the low-pass: a Gaussian of gain 1/2 at 1/(2P+1) cycles per frame."""
    f = global_branch.shape[1]
    k = torch.arange(f, dtype=torch.float64)
    dft = torch.exp(-2j * math.pi * torch.outer(k, k) / f)                         # [frequency, frame]
    cycles = torch.minimum(k, f - k) / f                                           # |frequency| of each bin
    low = 2.0 ** (-(cycles * (2 * halo + 1)) ** 2)
    keep_low = dft.conj().T @ torch.diag(low.to(dft.dtype)) @ dft / f              # [frame, frame]
    keep_high = torch.eye(f, dtype=dft.dtype) - keep_low
    assert keep_low.imag.abs().max() < 1e-12  # a symmetric low-pass: a real filter
    return (torch.einsum("tu,bu...->bt...", keep_low.real, global_branch.double())
            + torch.einsum("tu,bu...->bt...", keep_high.real, local_branch.double()))


def synthetic_rekey(gk, frames, gidx):
    """A rekey whose result depends on the query frame and the global frame (checks the core passes both)."""
    scale = 1 + 0.1 * frames.to(gk.dtype).view(1, -1, 1, 1, 1, 1)
    return gk.unsqueeze(1) * scale + 0.01 * gidx.to(gk.dtype).view(1, 1, -1, 1, 1, 1)


# ---------------------------------------------------------------------------------------------
# 1 + 3: the core and the mesh on real ranks
# ---------------------------------------------------------------------------------------------

F_CORE, B, S, H, D = 7, 2, 3, 2, 8
SPLITS = {
    1: [[(0, 7)]],
    2: [[(0, 2), (2, 7)], [(0, 4), (4, 7)]],
    3: [[(0, 1), (1, 5), (5, 7)], [(0, 3), (3, 4), (4, 7)]],  # first clip < P; a middle clip < P (multi-hop)
}
# the core's timesteps: its global phase (0.6 of 5 steps) is t >= 800
CORE_TIMESTEPS = [999.0, 900.0, 800.0, 500.0, 100.0]
# (halo, G, t, entropy, chunk_frames, rekey, spectral_blend); phase switch 800
CONFIGS = [
    (2, 3, 900.0, False, None, False, False),   # global phase
    (2, 3, 500.0, False, None, False, False),   # local phase
    (3, 0, 500.0, False, 1, False, False),      # no global frames
    (1, 10, 900.0, True, None, False, False),   # G >= F, entropy
    (2, 3, 500.0, True, 2, True, False),        # entropy, chunked, per-query global keys
    (10, 2, 900.0, False, None, False, False),  # window wider than the video
    (2, 3, 900.0, False, None, False, True),    # spectral blend, global phase
    (1, 10, 900.0, True, None, False, True),    # spectral blend, G >= F, entropy
    (1, 3, 900.0, True, 2, True, True),         # spectral blend, entropy, chunked, per-query global keys
    (3, 0, 900.0, False, None, False, True),    # spectral blend without global frames: the identity
]
BLEND_OF = {6: 0}  # a spectral-blend config -> the same config without it
HALO_CASES = [(1, 1), (2, 3), (5, 5), (0, 2)]


def core_inputs(seed=7):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, F_CORE, S, H, D, generator=gen) for _ in range(3)]


def _core_rank(mesh):
    from clipmesh.worker.strategies.dual_scope import DualScope
    rank, world_size = mesh.rank, mesh.world_size
    q, k, v = core_inputs()
    out = {"attend": {}, "halo": {}, "stats": {}}
    for si, clips in enumerate(SPLITS[world_size]):
        start, end = clips[rank]
        sizes = [e - s for s, e in clips]
        for ci, (halo, g, t, entropy, chunk, rekey, blend) in enumerate(CONFIGS):
            core = DualScope(mesh, hand_plan(clips, halo, g, entropy=entropy, spectral_blend=blend), rank, NATIVE,
                             CORE_TIMESTEPS, chunk_frames=chunk)
            core.begin_step(t)
            res = core.attend(q[:, start:end], k[:, start:end], v[:, start:end],
                              rekey=synthetic_rekey if rekey else None)
            out["attend"][(si, ci)] = res.numpy()
        # halos of a tensor whose entries are their global frame index
        x = torch.arange(start, end, dtype=torch.float32).view(1, -1, 1).expand(2, -1, 3).contiguous()
        for left, right in HALO_CASES:
            mesh.take_stats()
            got = mesh.exchange_halos(x, 1, left, right, sizes=sizes)
            stats = mesh.take_stats()
            learned = mesh.exchange_halos(x, 1, left, right)  # sizes learned by a small all-gather
            out["halo"][(si, left, right)] = ([h[0, :, 0].tolist() for h in got],
                                              [h[0, :, 0].tolist() for h in learned], stats)
        mesh.take_stats()
        mesh.all_gather_uneven(x, sizes, dim=1)
        out["stats"][si] = mesh.take_stats()
    return out


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda n: f"N{n}")
def core_results(request):
    return request.param, run_ranks(_core_rank, request.param, group=f"core-{request.param}")


def test_dual_scope_matches_dense_reference(core_results):
    world_size, results = core_results
    q, k, v = core_inputs()
    for si, clips in enumerate(SPLITS[world_size]):
        for ci, (halo, g, t, entropy, chunk, rekey, blend) in enumerate(CONFIGS):
            gidx = global_frame_indices(F_CORE, g)
            gk = synthetic_rekey(k[:, gidx], torch.arange(F_CORE), torch.tensor(gidx, dtype=torch.long)) if rekey else None
            want = dense_dual_scope(q, k, v, halo, gidx, t, 800.0, 10.0, entropy, NATIVE, gk, spectral_blend=blend)
            got = torch.cat([torch.from_numpy(results[r]["attend"][(si, ci)]) for r in range(world_size)], dim=1)
            diff = (got.double() - want).abs().max().item()
            assert diff <= TOL, f"clips={clips} config={CONFIGS[ci]}: max|diff| {diff:.2e}"
    # the phase bias is not a no-op: the two phases of the same config differ
    a, b_ = (torch.from_numpy(results[0]["attend"][(0, ci)]) for ci in (0, 1))
    assert (a - b_).abs().max() > 1e-2
    # nor is the spectral blend, where frames see globals outside their windows
    for blended, plain in BLEND_OF.items():
        got = [torch.from_numpy(results[r]["attend"][(0, ci)]) for ci in (blended, plain) for r in range(world_size)]
        assert (torch.cat(got[:world_size], 1) - torch.cat(got[world_size:], 1)).abs().max() > 1e-2


def test_spectral_blend_reference_keeps_each_branch_on_its_side_of_the_cut_off():
    """The test's own blend: a slow wave (period > the window) comes from the global branch, a
    fast one (period < the window) from the local branch; equal branches give themselves."""
    f, halo = 64, 2                                                   # cut-off: 1/5 cycles per frame
    t = torch.arange(f, dtype=torch.float64).view(1, f, 1)
    slow, fast = torch.cos(2 * math.pi * t / f), torch.cos(math.pi * t)  # 1/64 and 1/2 cycles per frame
    mixed = spectral_blend_reference(slow + fast, 3 * slow - fast, halo)
    assert (mixed - (slow - fast)).abs().max() < 0.05                 # slow from the first, fast from the second
    x = torch.randn(2, f, 3, dtype=torch.float64)
    assert (spectral_blend_reference(x, x, halo) - x).abs().max() < 1e-12


def test_exchange_halos_and_stats(core_results):
    world_size, results = core_results
    frame_bytes = 2 * 3 * 4  # x is [2, F_local, 3] float32
    for si, clips in enumerate(SPLITS[world_size]):
        total = clips[-1][1]
        for left, right in HALO_CASES:
            sent_total = 0
            for rank, (start, end) in enumerate(clips):
                got, learned, (sent, received, seconds) = results[rank]["halo"][(si, left, right)]
                want = [list(map(float, range(max(0, start - left), start))),
                        list(map(float, range(end, min(total, end + right))))]
                assert got == want and learned == want, f"clips={clips} rank={rank} halo=({left},{right})"
                assert received == frame_bytes * (len(want[0]) + len(want[1]))
                assert seconds > 0 or not (sent or received), "traffic took no time: the stats miss the wait"
                # what this rank sends: its frames inside every other rank's wanted ranges
                mine = set(range(start, end))
                expect_sent = sum(len(mine & (set(range(max(0, s - left), s)) | set(range(e, min(total, e + right)))))
                                  for r, (s, e) in enumerate(clips) if r != rank)
                assert sent == frame_bytes * expect_sent
                sent_total += sent
            assert sent_total == sum(frame_bytes * (len(range(max(0, s - left), s)) + len(range(e, min(total, e + right))))
                                     for s, e in clips)  # every byte received was sent once
        for rank, (start, end) in enumerate(clips):
            sent, received, _ = results[rank]["stats"][si]
            assert sent == frame_bytes * (end - start) * (world_size - 1)
            assert received == frame_bytes * (total - (end - start))


# ---------------------------------------------------------------------------------------------
# 2: tiny-wan end to end
# ---------------------------------------------------------------------------------------------

FRAMES, SIDE, STEPS, GUIDANCE, SEED = 33, 64, 3, 5.0, 99
LATENT = num_latent_frames(FRAMES, 4)  # 9
HALO, GLOBAL, SWITCH, BIAS = 2, 3, 800.0, 10.0  # timesteps 999, 857 (global phase) | 600 (local)
GLOBAL_PHASE = 0.67  # 2 of the 3 steps: t >= SWITCH, in the dense reference
E2E_NATIVE = 4  # stands in for Wan's 21 so the "native" RoPE policy clamps in a 9-frame video
POLICIES = list(GLOBAL_ROPE_POLICIES)
DEFAULT_POLICY = STRATEGY_SPECS["clip_parallel"].option("global_rope").default
E2E_SPLITS = {1: [(0, 9)], 2: [(0, 6), (6, 9)], 3: [(0, 4), (4, 5), (5, 9)]}


def e2e_plan(world_size, policy=DEFAULT_POLICY, blend=False):
    req = pb.SubmitJobRequest(prompt="a paper boat on a river", negative_prompt="blurry", num_frames=FRAMES,
                              height=SIDE, width=SIDE, num_inference_steps=STEPS, guidance_scale=GUIDANCE, seed=SEED,
                              model="tiny-wan", strategy="clip_parallel", num_workers=world_size)
    return hand_plan(E2E_SPLITS[world_size], HALO, GLOBAL, GLOBAL_PHASE, BIAS, entropy=False, request=req, name="cpe2e",
                     global_rope=policy, spectral_blend=blend)


def _rope(x, cos, sin):
    """Wan's interleaved-pair RoPE written as a complex product (independent of the strategy's code)."""
    xc = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(xc * torch.complex(cos[..., 0::2].double(), sin[..., 0::2].double())).flatten(-2)


def reference_positions(policy, f, g, halo, native):
    fr, gl = torch.arange(f)[:, None], torch.tensor(g)[None, :]
    return {"true": gl.expand(f, -1), "clamp": gl.clamp(min=fr - halo, max=fr + halo),
            "native": gl.clamp(min=fr - native + 1, max=fr + native - 1), "query": fr.expand(-1, len(g))}[policy]


class DenseWanAttention:
    """attn1 of the whole (single-process) video with the dense dual-scope reference."""

    def __init__(self, policy, state, blend=False):
        self.policy, self.state, self.blend = policy, state, blend

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))
        cos, sin = rotary_emb                                               # [1, F*S, 1, D], positions 0..F-1
        f = LATENT
        s = q.shape[1] // f
        gidx = global_frame_indices(f, GLOBAL)
        pos = reference_positions(self.policy, f, gidx, HALO, E2E_NATIVE)               # [F, G]
        cos_f, sin_f = cos.view(f, s, -1), sin.view(f, s, -1)
        k_raw = k.unflatten(1, (f, s))[:, gidx]                             # [B, G, S, H, D] before RoPE
        gk = _rope(k_raw.unsqueeze(1), cos_f[pos][None, :, :, :, None], sin_f[pos][None, :, :, :, None])
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        out = dense_dual_scope(*(t.unflatten(1, (f, s)) for t in (q, k, v)), HALO, gidx, self.state["t"], SWITCH,
                               BIAS, False, E2E_NATIVE, gk, spectral_blend=self.blend)
        out = out.flatten(1, 2).flatten(2, 3).to(hidden_states.dtype)
        return attn.to_out[1](attn.to_out[0](out))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from clipmesh.presets import model_folder
    return model_folder("tiny-wan")


@pytest.fixture(scope="module")
def model(folder):
    yield from single_thread_model(folder)


def _dense_run(model, policy, blend=False):
    req = e2e_plan(1).request
    cond, uncond = model.encode_prompt(req.prompt, req.negative_prompt, req.guidance_scale)
    noise = initial_noise(SEED, 0, LATENT, 16, SIDE // 8, SIDE // 8)
    state = {"t": None}
    transformer = model.denoiser
    hook = transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: state.update(t=float(kwargs["timestep"][0])), with_kwargs=True)
    attns = model.self_attentions()
    stock = [a.processor for a in attns]
    try:
        for a in attns:
            a.set_processor(DenseWanAttention(policy, state, blend))
        return model.pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=noise, height=SIDE, width=SIDE,
                          num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                          output_type="latent").frames
    finally:
        hook.remove()
        for a, p in zip(attns, stock):
            a.set_processor(p)


def _one_worker(model, policy, blend=False):
    from clipmesh.worker.mesh import Mesh, host_store
    from clipmesh.worker.render import denoise
    from clipmesh.worker.strategies import clip_parallel
    store, port = host_store("127.0.0.1", timeout_s=30)
    with mock.patch.object(clip_parallel, "native_frames", lambda model, plan: E2E_NATIVE), \
            Mesh.open("127.0.0.1", port, 0, 1, f"cp1-{policy}-{blend}", timeout_s=30, store=store) as mesh:
        return denoise(model, e2e_plan(1, policy, blend), 0, mesh)


@pytest.fixture(scope="module")
def by_policy(model):
    """(policy, spectral blend) -> the one-worker latents under that global RoPE policy, computed on
    first use and cached for the module: every test asking for one gets it, whichever runs first or alone."""
    cache: dict[tuple[str, bool], torch.Tensor] = {}

    def get(policy: str, blend: bool = False) -> torch.Tensor:
        if (policy, blend) not in cache:
            cache[policy, blend] = _one_worker(model, policy, blend)
        return cache[policy, blend]

    return get


@pytest.fixture(scope="module")
def one_worker(by_policy):
    return by_policy(DEFAULT_POLICY)


@pytest.mark.parametrize("policy", POLICIES)
def test_one_worker_equals_dense_reference(model, policy, by_policy):
    got = by_policy(policy)
    want = _dense_run(model, policy)
    diff = (got - want).abs().max().item()
    print(f"policy={policy} 1 worker vs dense reference: max|diff|={diff:.3e}")
    assert diff <= TOL
    assert {a.processor.__class__.__name__ for a in model.self_attentions()} == {"WanAttnProcessor"}  # restored
    assert not model.denoiser.rope._forward_hooks


def _e2e_rank(mesh, folder, blend=False):
    from clipmesh.worker.adapters import load_adapter
    from clipmesh.worker.render import denoise
    from clipmesh.worker.strategies import clip_parallel
    # undone after: the rank processes are pooled, and a later test's rank must see the real one
    with mock.patch.object(clip_parallel, "native_frames", lambda model, plan: E2E_NATIVE):
        model, plan = load_adapter(folder, "cpu", torch.float32), e2e_plan(mesh.world_size, blend=blend)
        return denoise(model, plan, mesh.rank, mesh).numpy()


@pytest.mark.parametrize("world_size", [2, 3])
def test_workers_equal_one_worker(world_size, folder, one_worker):
    results = run_ranks(_e2e_rank, world_size, str(folder), group=f"e2e-{world_size}")
    for rank, latents in sorted(results.items()):
        diff = (torch.from_numpy(latents) - one_worker).abs().max().item()
        print(f"world_size={world_size} clips={E2E_SPLITS[world_size]} rank={rank} max|diff|={diff:.3e}")
        assert diff <= TOL


def test_spectral_blend_end_to_end(model, folder, by_policy):
    """tiny-wan with the spectral blend: one worker equals the dense reference blending the whole
    video's two branches, 3 workers (uneven) equal one, and the blend changes the video."""
    one = by_policy(DEFAULT_POLICY, True)
    diff = (one - _dense_run(model, DEFAULT_POLICY, True)).abs().max().item()
    print(f"spectral blend, 1 worker vs dense reference: max|diff|={diff:.3e}")
    assert diff <= TOL
    assert (one - by_policy(DEFAULT_POLICY)).abs().max() > 1e-3
    for rank, latents in sorted(run_ranks(_e2e_rank, 3, str(folder), True, group="e2e-blend-3").items()):
        diff = (torch.from_numpy(latents) - one).abs().max().item()
        print(f"spectral blend, clips={E2E_SPLITS[3]} rank={rank} max|diff|={diff:.3e}")
        assert diff <= TOL


def test_policies_differ(by_policy):
    """The RoPE policies are really different (so the dense comparison above tells them apart)."""
    results = {policy: by_policy(policy) for policy in POLICIES}
    assert len(results) == len(POLICIES)
    for i, a in enumerate(POLICIES):
        for b in POLICIES[i + 1:]:
            assert (results[a] - results[b]).abs().max() > 1e-3, (a, b)


def test_clip_parallel_is_not_exact(model, one_worker):
    """Sanity: with a window narrower than the video the result differs from full attention."""
    req = e2e_plan(1).request
    cond, uncond = model.encode_prompt(req.prompt, req.negative_prompt, req.guidance_scale)
    full = model.pipe(prompt_embeds=cond, negative_prompt_embeds=uncond,
                      latents=initial_noise(SEED, 0, LATENT, 16, SIDE // 8, SIDE // 8), height=SIDE, width=SIDE,
                      num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent").frames
    assert (full - one_worker).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# 4: global frame indices
# ---------------------------------------------------------------------------------------------

def test_global_frame_indices_properties():
    from clipmesh.plan import split_clips
    from clipmesh.worker.strategies.dual_scope import DualScope
    for f in range(1, 130):
        for g in list(range(0, min(f, 40) + 3)) + [f - 1, f, f + 1, 3 * f]:
            if g < 0:
                continue
            idx = global_frame_indices(f, g)
            assert len(idx) == min(g, f)
            assert idx == sorted(set(idx)) and all(0 <= i < f for i in idx)
            gaps = [b - a for a, b in zip(idx, idx[1:])]
            assert not gaps or max(gaps) - min(gaps) <= 1, (f, g, idx)
            if idx:  # centred: the margins before the first and after the last differ by at most one gap
                assert abs(idx[0] - (f - 1 - idx[-1])) <= (max(gaps) if gaps else 1)
    # what the ranks contribute, concatenated in rank order, is the same list for any split
    for f, g in [(9, 3), (21, 16), (40, 16), (7, 10), (50, 0)]:
        want = global_frame_indices(f, g)
        for n in range(1, min(f, 6) + 1):
            for clips in (split_clips(f, n), [(0, 1)] + [(a + 1, b + 1) for a, b in split_clips(f - 1, n - 1)] if n > 1 else []):
                if not clips:
                    continue
                plan = hand_plan(clips, 2, g)
                cores = [DualScope(None, plan, r, native_frames=21) for r in range(n)]
                got = [c.start + i for c in cores for i in c.owned_global]
                assert got == want and [c.global_counts for c in cores] == [cores[0].global_counts] * n
                assert sum(cores[0].global_counts) == len(want)


class _OneRank:
    """The mesh of a world of one: no neighbours, every gather is this rank's own tensor."""

    def exchange_halos(self, x, dim, left, right, sizes=None):
        assert left == right == [0]  # what each rank reaches beyond its clip
        return x.narrow(dim, 0, 0), x.narrow(dim, 0, 0)

    def all_gather_uneven(self, x, sizes, dim):
        return x


@pytest.mark.parametrize("blend", [False, True])
def test_without_the_log_sum_exp_kernel_the_result_is_the_same(blend):
    """Where the CPU flash kernel is missing (GPUs), attend concatenates the two key sets with the
    phase bias as a mask, and the spectral blend computes the window-only output by another call."""
    from clipmesh.worker.strategies import dual_scope
    q, k, v = core_inputs()
    for halo, g, t, entropy, chunk, rekey, _ in CONFIGS:
        runs = []
        for with_lse in (True, False):
            core = dual_scope.DualScope(_OneRank(), hand_plan([(0, F_CORE)], halo, g, entropy=entropy,
                                                              spectral_blend=blend), 0, NATIVE, CORE_TIMESTEPS,
                                        chunk_frames=chunk)
            core.begin_step(t)
            with mock.patch.object(dual_scope, "_has_lse_attention", lambda q: with_lse):
                runs.append(core.attend(q, k, v, rekey=synthetic_rekey if rekey else None))
        assert (runs[0] - runs[1]).abs().max() <= TOL, (halo, g, t, entropy, chunk, rekey, blend)


def test_the_log_sum_exp_kernel_follows_device_and_dtype():
    """CPU flash attention for fp32/fp64; bf16 on a CPU has none (attend concatenates), and the
    path then equals the kernel's (test above). The CUDA kernels: tests/test_gpu.py."""
    from clipmesh.worker.strategies import dual_scope

    q = torch.zeros(1, 2, 4, 8)
    assert dual_scope._lse_kernel(q) == "cpu" and dual_scope._lse_kernel(q.double()) == "cpu"
    assert dual_scope._lse_kernel(q.bfloat16()) is None and not dual_scope._has_lse_attention(q.bfloat16())
    out, lse = dual_scope._attention(q.normal_(), q.clone().normal_(), q.clone().normal_(), 0.5)
    assert out.shape == (1, 2, 4, 8) and lse.shape == (1, 2, 4)
