"""Step caches (worker/savers/step_cache.py) on tiny-unet3d (step rehash: every:K, auto:X) and
tiny-wan (diffusers' FirstBlockCache and TaylorSeer), under exact and clip_parallel.

Per family and world size (1, 2, 3; the coordinator's own plans) the ranks load the model once
and run every case, as a worker serves many jobs with one model:
- with the cache "off" the run equals the plain run bit for bit, and so does a plain run after
  the cached jobs (the model is left as it was found: no instance forward, no diffusers hook);
- enabled, the steps reported full (StepReport.full_pass) are the ones the rule says (every:K,
  taylorseer:K: fixed; auto:X: replayed here from the reused feature), and a module inside the
  skipped part ran exactly at those steps (a forward hook counts its calls per step);
- 2 and 3 workers take the decisions of 1 worker on every rank, and their latents equal the
  1-worker run's within 1e-5: every rank skipped the same collectives, nobody hung;
- the cached run differs from the full run, by a bounded relative L2 (printed).
And block_pipeline refuses a step cache at submit and at install.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from clipmesh import presets
from clipmesh.specs import SpecError
from clipmesh.v1 import clipmesh_pb2 as pb
from conftest import planned
from ranks import run_ranks

TOL = 1e-5
MAX_REL_L2 = 0.2  # the approximation's bound on these tiny models (observed: well below 0.05)
STEPS, GUIDANCE, SEED = 8, 7.0, 99
STRATEGIES = ("exact", "clip_parallel")
OPTIONS = {"clip_parallel": dict(clip_parallel=pb.ClipParallelOptions(local_halo=1, global_frames=2))}
# family preset -> (frames, side, caches run on one worker, caches run on 2 and 3): "" is a plain
# request (no savers), run first and again last
FAMILIES = {
    "tiny-unet3d": (9, 32, ("", "off", "every:2", "every:3", "auto:0.5", ""), ("every:3", "auto:0.5")),
    "tiny-wan": (17, 64, ("", "off", "fbc:0.2", "taylorseer:2", "taylorseer:3", ""), ("fbc:0.2", "taylorseer:2")),
}


def _plan(name: str, strategy: str, world_size: int, cache: str) -> pb.RenderPlan:
    frames, side, _, _ = FAMILIES[name]
    savers = pb.SaverOptions(step_cache=cache) if cache else None
    req = pb.SubmitJobRequest(prompt="a lighthouse at dusk", negative_prompt="blurry", num_frames=frames, height=side,
                              width=side, num_inference_steps=STEPS, guidance_scale=GUIDANCE, seed=SEED, model=name,
                              strategy=strategy, num_workers=world_size, fps=8, savers=savers,
                              **OPTIONS.get(strategy, {}))
    return planned(req, world_size, f"cache-{strategy}-{world_size}")


def _probes(model):
    """(a module inside the part a cache skips, the module whose output step rehash reuses or None)."""
    if model.family == "wan":
        return model.denoiser.blocks[-1].ffn.net[0], None  # FBC skips the block, TaylorSeer forecasts its ffn
    path = model.deep_path()
    return model.denoiser.mid_block.resnets[0], path.reused


def _leftovers(model) -> list[str]:
    """What of a job's patches is left on the model: instance forwards, diffusers hooks, an enabled cache."""
    found = [f"{name}.forward" for name, m in model.denoiser.named_modules() if "forward" in m.__dict__]
    found += [f"{name} diffusers hook" for name, m in model.denoiser.named_modules()
              if getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.hooks]
    return found + (["cache enabled"] if getattr(model.denoiser, "is_cache_enabled", False) else [])


def _family_main(mesh, name: str):
    """One rank: every strategy and case of the family with one loaded model. Returns
    {(strategy, i): (the video's final latents, full_pass per step, skipped-module calls per step,
    the reused feature per step (1 worker, rehash))} and what was left on the model."""
    from clipmesh.worker.adapters import load_adapter
    from clipmesh.worker.render import denoise

    model = load_adapter(presets.model_folder(name), "cpu", torch.float32)
    _, _, one, many = FAMILIES[name]
    skipped, reused = _probes(model)
    out = {}
    for strategy in STRATEGIES:
        for i, cache in enumerate(one if mesh.world_size == 1 else many):
            calls, features, reports = [0], [], []
            handles = [skipped.register_forward_hook(lambda *a: calls.__setitem__(-1, calls[-1] + 1))]
            if reused is not None and mesh.world_size == 1:
                handles.append(reused.register_forward_hook(lambda m, a, o: features.append(o.numpy().copy())))

            def on_step(report):
                reports.append(report.full_pass)
                calls.append(0)
            try:
                latents = denoise(model, _plan(name, strategy, mesh.world_size, cache), mesh.rank, mesh, on_step)
            finally:
                for handle in handles:
                    handle.remove()
            out[strategy, i] = (latents.numpy(), reports, calls[:-1], features)
    return out, _leftovers(model)


@functools.cache
def runs(name: str, world_size: int) -> dict:
    """rank -> _family_main's result, once per family and world size."""
    return run_ranks(_family_main, world_size, name, group=f"cache-{name}-{world_size}", timeout=400)


def _expected(cache: str, features: list[np.ndarray]) -> list[bool]:
    """The steps the rule makes full (auto: replayed from the reused feature at each step)."""
    from clipmesh.worker.savers.step_cache import MAX_REHASH, TAYLORSEER_WARMUP as WARMUP

    kind, _, value = cache.partition(":")
    if kind == "every":
        return [n % int(value) == 0 for n in range(STEPS)]
    if kind == "taylorseer":  # diffusers' rule after WARMUP full steps (2: 0, 1, then 3, 3+K, ...)
        return [n < WARMUP or (n - WARMUP - 1) % int(value) == 0 for n in range(STEPS)]
    assert kind == "auto"
    decisions, last, kept, rate = [], None, None, None
    for n in range(STEPS):
        full = last is None or rate is None or n - last > MAX_REHASH or (n - last) * rate >= float(value)
        decisions.append(full)
        if full:
            if kept is not None:
                rate = _rel_l2(features[n], kept) / (n - last)
            kept, last = features[n], n
    return decisions


def _rel_l2(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", FAMILIES)
def test_one_worker(name, strategy):
    (results, left), = runs(name, 1).values()
    assert left == [], f"left on the model after the jobs: {left}"
    cases = FAMILIES[name][2]
    plain, _, plain_calls, _ = results[strategy, 0]
    assert plain_calls == [plain_calls[0]] * STEPS and plain_calls[0] > 0
    per_full_step = plain_calls[0]  # the probe's calls in a full step (Wan: cond and uncond)
    for i, cache in enumerate(cases):
        latents, full, calls, features = results[strategy, i]
        if cache in ("", "off"):
            assert np.array_equal(latents, plain), f"{cache or 'plain'} run {i} differs from the first plain run"
            assert full == [True] * STEPS
            continue
        # the probe ran at a step exactly when it was reported full (FBC: all calls of the step computed)
        assert [c == per_full_step for c in calls] == full, f"{cache}: probe calls {calls}, full {full}"
        if not cache.startswith("fbc"):
            assert full == _expected(cache, features), f"{cache}: reported {full}"
        assert full[0] and not all(full), f"{cache}: {full} (the first step is full, and something is cached)"
        error = _rel_l2(latents, plain)
        print(f"{name} {strategy} {cache}: {sum(full)}/{STEPS} full passes {[int(f) for f in full]}, "
              f"latent relative L2 vs full: {error:.2e}")
        assert 0 < error < MAX_REL_L2


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("name", FAMILIES)
def test_workers_agree_and_equal_one_worker(name, world_size):
    (one, _), = runs(name, 1).values()
    results = runs(name, world_size)
    _, _, one_cases, cases = FAMILIES[name]
    for rank, (runs_of_rank, left) in sorted(results.items()):
        assert left == [], f"rank {rank}: left on the model: {left}"
        for strategy in STRATEGIES:
            for i, cache in enumerate(cases):
                latents, full, _, _ = runs_of_rank[strategy, i]
                reference, reference_full, _, _ = one[strategy, one_cases.index(cache)]
                diff = float(np.abs(latents - reference).max())
                print(f"{name} {strategy} {cache} world_size={world_size} rank={rank}: full {[int(f) for f in full]}, "
                      f"max|diff| vs 1 worker {diff:.2e}")
                assert full == reference_full, f"rank {rank} {strategy} {cache}: decisions {full} != {reference_full}"
                assert diff <= TOL


def test_block_pipeline_refuses_a_step_cache():
    from clipmesh.coordinator.errors import InvalidArgument
    from clipmesh.coordinator.validate import validate_request
    from clipmesh.savers import check_savers, parse_step_cache
    from clipmesh.worker.savers.step_cache import install_step_cache

    for cache in ("fbc:0.1", "taylorseer:3"):
        with pytest.raises(SpecError, match="block_pipeline") as refused:
            check_savers(pb.SaverOptions(step_cache=cache), "wan", "block_pipeline")
        assert refused.value.field == "savers.step_cache"
        check_savers(pb.SaverOptions(step_cache=cache), "wan", "exact")
        # the worker refuses before it touches the model or the mesh (neither exists here)
        job = SimpleNamespace(plan=SimpleNamespace(strategy="block_pipeline"), model=None, mesh=None)
        with pytest.raises(ValueError, match="savers.step_cache"):
            install_step_cache(job, None, parse_step_cache(cache, "wan"))
    check_savers(pb.SaverOptions(step_cache="off"), "wan", "block_pipeline")
    req = pb.SubmitJobRequest(prompt="a fox", num_frames=17, height=64, width=64, num_inference_steps=4,
                              guidance_scale=5.0, fps=8, model="tiny-wan", strategy="block_pipeline",
                              savers=pb.SaverOptions(step_cache="taylorseer:3"))
    with pytest.raises(InvalidArgument, match="savers.step_cache"):
        validate_request(req, pb.ModelInfo(**presets.model_limits("tiny-wan")), ["tiny-wan"])
