"""`clip_parallel` at or below the model's native length is `exact` (issue 20).

A query frame's window holds 2P+1 latent frames, shifted inward at the video's ends and never
clipped; P defaults to half the model's native latent frames. So a video no longer than the
native length is one window for every frame: full attention. A global frame the window already
holds adds nothing, entropy scaling only acts beyond the native length, FreeNoise's
rescheduling only repeats noise beyond the first window, and FreeLong's spectral blend has no
global frame outside a window to blend in: with every option that the defaults
leave off turned on, clip_parallel on 1, 2 and 3 workers (uneven) still equals `exact`.
Before this, a 17-frame toy-wan video under clip_parallel's defaults attended over 3 of its 5
latent frames at either end and came out green for "a red circle".

Also: the rescheduled noise itself (split-independent; each window a shuffle of the first).
"""

from __future__ import annotations

import pytest
import torch

from clipmesh.specs import STRATEGY_SPECS, resolve_options
from clipmesh.v1 import clipmesh_pb2 as pb
from ranks import run_ranks

TOL = 1e-5
CASES = {  # model: (frames, latent frames, native latent frames of its ModelInfo)
    "tiny-wan": (33, 9, 21),
    "tiny-unet3d": (9, 9, 16),
}
SPLITS = {1: [(0, 9)], 2: [(0, 6), (6, 9)], 3: [(0, 4), (4, 5), (5, 9)]}


def plan_for(model_info: pb.ModelInfo, name: str, strategy: str, world_size: int) -> pb.RenderPlan:
    """By hand, not by the planner: SPLITS has clips shorter than the halo, which the planner
    never makes, and equality with exact must hold on them too."""
    frames, latent, _ = CASES[name]
    req = pb.SubmitJobRequest(prompt="a red circle moving right", negative_prompt="blurry", num_frames=frames,
                              height=64, width=64, num_inference_steps=3, guidance_scale=5.0, seed=11, model=name,
                              strategy=strategy, num_workers=world_size)
    plan = pb.RenderPlan(request=req, strategy=strategy, world_size=world_size, num_latent_frames=latent,
                         clips=[pb.ClipRange(start=s, end=e) for s, e in SPLITS[world_size]], start_step=0,
                         group_name=f"native-{name}-{strategy}-{world_size}", timeout_seconds=60)
    if strategy == "clip_parallel":
        # the model's defaults, with what they leave off turned on: none of it may act here
        req.clip_parallel.CopyFrom(pb.ClipParallelOptions(entropy_scaling=True, noise_reschedule=True,
                                                          spectral_blend=True))
        plan.clip_parallel.CopyFrom(resolve_options(STRATEGY_SPECS["clip_parallel"], req, model_info))
    return plan


def _rank(mesh, name, strategy):
    from clipmesh.presets import model_folder
    from clipmesh.worker.adapters import load_adapter
    from clipmesh.worker.render import denoise
    model = load_adapter(model_folder(name), "cpu", torch.float32)
    info = model.model_info(name)
    plan = plan_for(info, name, strategy, mesh.world_size)
    return denoise(model, plan, mesh.rank, mesh).numpy(), plan.clip_parallel.SerializeToString()


@pytest.fixture(scope="module", params=list(CASES))
def exact(request):
    name = request.param
    return name, torch.from_numpy(run_ranks(_rank, 1, name, "exact", group=f"native-exact-{name}")[0][0])


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_clip_parallel_equals_exact_within_the_native_length(exact, world_size):
    name, want = exact
    results = run_ranks(_rank, world_size, name, "clip_parallel", group=f"native-cp-{name}-{world_size}")
    opts = pb.ClipParallelOptions.FromString(results[0][1])
    _, latent, native = CASES[name]
    assert opts.local_halo == native // 2 and 2 * opts.local_halo + 1 >= latent  # P follows the model
    assert opts.global_frames > 0 and opts.entropy_scaling and opts.noise_reschedule and opts.spectral_blend  # none acting
    for rank, (latents, _) in sorted(results.items()):
        diff = (torch.from_numpy(latents) - want).abs().max().item()
        print(f"{name} N={world_size} rank {rank}: clip_parallel vs exact max|diff| {diff:.2e}")
        assert diff <= TOL


def test_rescheduled_noise_is_a_shuffle_of_the_first_window_and_split_independent():
    from clipmesh.worker.noise import initial_noise, rescheduled_noise
    window, frames = 5, 23
    whole = rescheduled_noise(7, 0, frames, window, 4, 3, 3)
    first = initial_noise(7, 0, window, 4, 3, 3)
    assert torch.equal(whole[:, :, :window], first)  # the first window is the job's own noise
    orders = []
    for start in range(window, frames, window):  # each later window: distinct frames of the first, reordered
        part = whole[:, :, start:start + window]
        order = [next(j for j in range(window) if torch.equal(part[:, :, i], first[:, :, j]))
                 for i in range(part.shape[2])]
        assert len(set(order)) == len(order)
        orders.append(order)
    assert any(o != list(range(len(o))) for o in orders)  # shuffled, not repeated as is
    for a, b in [(0, 3), (3, 11), (11, 12), (12, 23)]:  # any split draws the same frames
        assert torch.equal(rescheduled_noise(7, a, b, window, 4, 3, 3), whole[:, :, a:b])
    assert not torch.equal(rescheduled_noise(8, 0, frames, window, 4, 3, 3), whole)  # the seed matters
