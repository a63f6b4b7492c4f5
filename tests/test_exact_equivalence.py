"""The oracle: clip-parallel `exact` rendering equals vanilla diffusers WanPipeline.

N real processes (gloo over loopback) each denoise their clip of the tiny-wan preset; the
gathered latents must match `WanPipeline.__call__` on the whole video from the same noise.
17 frames -> 5 latent frames: 2 ranks split 3+2, 3 ranks 2+2+1 (uneven both times).
"""

from __future__ import annotations

import os
import subprocess
import sys
from unittest import mock

import pytest
import torch

from clipmesh.plan import num_latent_frames, split_clips
from clipmesh.v1 import clipmesh_pb2 as pb
from clipmesh.worker.noise import initial_noise
from conftest import planned
from ranks import run_ranks, single_thread_model, solo_mesh

FRAMES, SIDE, STEPS, GUIDANCE, SEED = 17, 64, 3, 5.0, 1234
LATENT = num_latent_frames(FRAMES, 4)
TOL = 1e-5


def _plan(world_size: int, name: str = "equiv") -> pb.RenderPlan:
    req = pb.SubmitJobRequest(prompt="a lighthouse at dusk", negative_prompt="blurry", num_frames=FRAMES,
                              height=SIDE, width=SIDE, num_inference_steps=STEPS, guidance_scale=GUIDANCE, seed=SEED,
                              model="tiny-wan", strategy="exact", num_workers=world_size)
    return planned(req, world_size, f"{name}-{world_size}")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # a private cache: the test also exercises building the preset from scratch
    from clipmesh.presets import model_folder
    with mock.patch.dict(os.environ, {"CLIPMESH_CACHE": str(tmp_path_factory.mktemp("cache"))}):
        return model_folder("tiny-wan")


@pytest.fixture(scope="module")
def model(folder):
    yield from single_thread_model(folder)


def _vanilla(model) -> torch.Tensor:
    req = _plan(1).request
    cond, uncond = model.encode_prompt(req.prompt, req.negative_prompt, req.guidance_scale)
    noise = initial_noise(SEED, 0, LATENT, 16, SIDE // 8, SIDE // 8)
    return model.pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=noise, height=SIDE, width=SIDE,
                num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent").frames


@pytest.fixture(scope="module")
def reference(model):
    return _vanilla(model)


def _rank_main(mesh, folder, stop_after):
    """One worker process: load, denoise its clip; `stop_after`: the last rank alone asks to stop
    once it has done that many steps."""
    from clipmesh.worker.adapters import load_adapter
    from clipmesh.worker.render import Cancelled, denoise

    model, plan, steps = load_adapter(folder, "cpu", torch.float32), _plan(mesh.world_size), []
    wants_stop = stop_after is not None and mesh.rank == mesh.world_size - 1
    try:
        latents = denoise(model, plan, mesh.rank, mesh, on_step=lambda report: steps.append(report.step),
                          should_stop=lambda: wants_stop and len(steps) >= stop_after)
        return "ok", latents.numpy(), steps
    except Cancelled:
        return "cancelled", None, steps


def _run_ranks(world_size, folder, stop_after=None):
    return run_ranks(_rank_main, world_size, str(folder), stop_after, group=f"equiv-{world_size}")


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_exact_matches_vanilla(world_size, folder, reference):
    results = _run_ranks(world_size, folder)
    for rank, (status, latents, steps) in sorted(results.items()):
        assert status == "ok" and steps == list(range(1, STEPS + 1))
        diff = (torch.from_numpy(latents) - reference).abs().max().item()
        print(f"world_size={world_size} rank={rank} clips={split_clips(LATENT, world_size)} max|diff|={diff:.3e}")
        assert diff <= TOL, f"rank {rank}: max abs diff {diff} > {TOL}"


def test_cancel_on_one_rank_stops_all_at_same_step(folder):
    results = _run_ranks(2, folder, stop_after=1)
    assert [results[r][0] for r in (0, 1)] == ["cancelled", "cancelled"]
    assert [results[r][2] for r in (0, 1)] == [[1], [1]]  # both stopped at the same boundary


def test_install_remove_restores_vanilla(model, reference):
    from clipmesh.worker.render import Cancelled, denoise

    attns = model.self_attentions()
    stock = [a.processor for a in attns]
    with solo_mesh("restore") as mesh:
        denoise(model, _plan(1), 0, mesh)
        with pytest.raises(Cancelled):  # removal must also happen when the loop is interrupted
            denoise(model, _plan(1), 0, mesh, should_stop=lambda: True)
    assert [a.processor for a in attns] == stock
    assert not model.denoiser.rope._forward_hooks
    assert torch.equal(_vanilla(model), reference)


def test_plan_math_and_noise_independent_of_split():
    assert LATENT == 5
    assert split_clips(5, 2) == [(0, 3), (3, 5)]
    assert split_clips(5, 3) == [(0, 2), (2, 4), (4, 5)]
    whole = initial_noise(SEED, 0, 5, 16, 4, 4)
    assert torch.equal(whole, torch.cat([initial_noise(SEED, 0, 2, 16, 4, 4), initial_noise(SEED, 2, 5, 16, 4, 4)], 2))
    assert not torch.equal(whole[:, :, 0], whole[:, :, 1])
    assert not torch.equal(whole, initial_noise(SEED + 1, 0, 5, 16, 4, 4))


def _expected_wan_limits(transformer: dict, vae: dict) -> dict:
    """Wan limits worked out here from a transformer and a VAE config, independently of
    clipmesh.presets: each halving of the VAE's dim_mult levels halves the side, each True in
    temperal_downsample halves time; a patch covers patch_size pixels of latent; RoPE has one row
    per latent frame (after temporal patching); 1280 is Wan's largest trained side (720p);
    21 latent frames = Wan's 81 trained frames; the strategies: those of the strategy table
    (clipmesh.specs) for the Wan family; one expert (model_index.json names no transformer_2);
    text-to-video only (a WanPipeline without expand_timesteps)."""
    from clipmesh.specs import STRATEGY_SPECS
    p_t, p_h, p_w = transformer["patch_size"]
    assert p_h == p_w
    spatial = 2 ** (len(vae["dim_mult"]) - 1)
    temporal = 2 ** sum(bool(d) for d in vae["temperal_downsample"])
    rope = transformer["rope_max_seq_len"]
    want = {"family": "wan", "spatial_multiple": spatial * p_h, "temporal_stride": temporal,
            "max_frames": (rope // p_t - 1) * temporal + 1, "max_side": min(rope * spatial * p_h, 1280),
            "strategies": [name for name, spec in STRATEGY_SPECS.items() if "wan" in spec.families],
            "native_latent_frames": 21, "num_layers": transformer["num_layers"], "experts": 1, "modes": ["t2v"]}
    assert {"exact", "clip_parallel", "block_pipeline"} <= set(want["strategies"])
    return want


def _check_limits(got: dict, want: dict, name: str, transformer: dict) -> None:
    assert got.pop("name") == name
    heads = got.pop("attention_heads", None)  # a field being added: checked when present
    if heads is not None:
        assert heads == transformer["num_attention_heads"], (name, heads)
    wrong = {key: (got.get(key), want.get(key)) for key in got.keys() | want.keys() if got.get(key) != want.get(key)}
    assert not wrong, f"{name}: limits (got, want): {wrong}"
    assert got == want


def test_model_limits_without_torch(folder, tmp_path):
    import json

    from clipmesh.presets import PRESETS
    preset = PRESETS["tiny-wan"]
    # A second folder holding only config files (as a downloaded real Wan folder: no
    # scale_factor_* in the VAE config) whose every derived limit differs from tiny-wan's, so a
    # limit that is a constant, or read from the wrong key, shows.
    other = tmp_path / "other-wan"
    other_transformer = {**preset["transformer"], "patch_size": [2, 2, 2], "num_layers": 7, "num_attention_heads": 3,
                         "rope_max_seq_len": 40}
    other_vae = {**preset["vae"], "dim_mult": [1, 2, 4], "temperal_downsample": [False, True, False]}
    for sub, cfg in (("transformer", {"_class_name": "WanTransformer3DModel", **other_transformer}),
                     ("vae", {"_class_name": "AutoencoderKLWan", **other_vae})):
        (other / sub).mkdir(parents=True)
        (other / sub / "config.json").write_text(json.dumps(cfg))
    (other / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))

    code = ("import json, sys, clipmesh.presets as p; "
            "print(json.dumps([p.model_limits('tiny-wan')] + [p.model_limits(f) for f in sys.argv[1:]])); "
            "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code, str(folder), str(other)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    by_name, from_folder, from_other = json.loads(proc.stdout)

    # the folder built from the preset: limits from its config files
    want = _expected_wan_limits(preset["transformer"], preset["vae"])
    assert (want["spatial_multiple"], want["temporal_stride"], want["max_frames"], want["max_side"]) == (16, 4, 4093, 1280)
    _check_limits(from_folder, want, str(folder), preset["transformer"])
    # a folder with other configs: other limits
    want_other = _expected_wan_limits(other_transformer, other_vae)
    assert (want_other["spatial_multiple"], want_other["temporal_stride"], want_other["max_frames"],
            want_other["max_side"], want_other["num_layers"]) == (8, 2, 39, 320, 7)
    _check_limits(from_other, want_other, str(other), other_transformer)
    # the preset name: the same model as its folder, its frame and side caps tighter (a CPU demo model)
    assert by_name["spatial_multiple"] == 16 and by_name["temporal_stride"] == 4
    for key in ("family", "spatial_multiple", "temporal_stride", "strategies", "native_latent_frames", "num_layers"):
        assert by_name[key] == want[key], key
    assert by_name["max_frames"] <= want["max_frames"] and (by_name["max_frames"] - 1) % want["temporal_stride"] == 0
    assert by_name["max_side"] <= want["max_side"] and by_name["max_side"] % want["spatial_multiple"] == 0
    heads = by_name.get("attention_heads")
    assert heads is None or heads == preset["transformer"]["num_attention_heads"]
