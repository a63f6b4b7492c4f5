"""The planner's decisions as pure functions: strategy choice, option precedence, clip sizes."""

import pytest

from clipmesh import specs
from clipmesh.coordinator.planner import make_plan
from clipmesh.plan import split_clips, split_weighted
from clipmesh.v1 import clipmesh_pb2 as pb

WAN = pb.ModelInfo(name="tiny-wan", family="wan", spatial_multiple=16, temporal_stride=4, max_frames=1025,
                   max_side=512, strategies=["exact", "clip_parallel"], native_latent_frames=21)


CLIP_PARALLEL, BLOCK_PIPELINE = specs.STRATEGY_SPECS["clip_parallel"], specs.STRATEGY_SPECS["block_pipeline"]
BLOCK_PIPELINE_DEFAULTS = {o.name: o.default for o in BLOCK_PIPELINE.options}


def choose_strategy(req, model) -> str:
    return specs.choose_spec(req, model).name


def max_workers(req, model) -> int:
    return specs.worker_limit(specs.choose_spec(req, model), req, model)


def request(**kw) -> pb.SubmitJobRequest:
    return pb.SubmitJobRequest(**{"prompt": "p", "num_frames": 17, "height": 32, "width": 32,
                                  "num_inference_steps": 2, "fps": 8, **kw})


def test_strategy_defaults_to_clip_parallel_only_beyond_native_length():
    assert choose_strategy(request(num_frames=81), WAN) == "exact"          # 21 latent = native
    assert choose_strategy(request(num_frames=85), WAN) == "clip_parallel"  # 22 latent
    assert choose_strategy(request(num_frames=85, strategy="exact"), WAN) == "exact"
    exact_only = pb.ModelInfo(); exact_only.CopyFrom(WAN); del exact_only.strategies[1]
    assert choose_strategy(request(num_frames=257), exact_only) == "exact"


def test_options_precedence_request_over_model_over_family():
    model = pb.ModelInfo(); model.CopyFrom(WAN)
    model.clip_parallel_defaults.local_halo = 6
    opts = specs.resolve_options(CLIP_PARALLEL, request(clip_parallel=pb.ClipParallelOptions(global_frames=0)), model)
    assert (opts.local_halo, opts.global_frames) == (6, 0)  # G=0 given explicitly is kept, not defaulted
    assert opts.global_phase == CLIP_PARALLEL.option("global_phase").default_for("wan")
    assert all(opts.HasField(f) for f in ("local_halo", "global_frames", "global_phase", "phase_bias",
                                          "entropy_scaling"))


@pytest.mark.parametrize("latent,speeds", [(10, [1, 3]), (33, [2, 1, 1]), (7, [5, 1, 1]), (64, [1, 1, 1, 4])])
def test_weighted_clips_tile_the_video_and_follow_speed(latent, speeds):
    clips = split_weighted(latent, speeds)
    assert clips[0][0] == 0 and clips[-1][1] == latent
    assert all(a[1] == b[0] for a, b in zip(clips, clips[1:]))
    lengths = [e - s for s, e in clips]
    for length, speed in zip(lengths, speeds):
        assert abs(length - latent * speed / sum(speeds)) <= 1.0 + 1e-9


def test_weighted_clips_respect_the_halo_and_equal_speeds_split_evenly():
    assert split_weighted(10, [1, 100], min_len=3) == [(0, 3), (3, 10)]
    assert split_weighted(9, [1, 1, 1, 1], min_len=8) == split_clips(9, 4)  # cannot honour 8: even split
    assert split_weighted(13, [2.0, 2.0]) == split_clips(13, 2)


def test_make_plan_sizes_clips_by_worker_speed():
    job = pb.Job(id="j1", request=request(num_frames=129, strategy="clip_parallel"))  # 33 latent frames
    members = [pb.WorkerInfo(id="a", speed=100.0), pb.WorkerInfo(id="b", speed=300.0)]
    plan = make_plan(job, members, WAN, timeout_seconds=30)
    assert [(c.start, c.end) for c in plan.clips] == [(0, 10), (10, 33)]  # share 8.25, lifted to the halo
    assert plan.strategy == "clip_parallel" and plan.clip_parallel.local_halo == 10
    assert plan.group_name == "clipmesh-j1-1" and plan.num_latent_frames == 33 and plan.world_size == 2  # attempt 1


def test_block_pipeline_plan_splits_layers_not_frames():
    model = pb.ModelInfo(); model.CopyFrom(WAN); model.num_layers = 30; model.strategies.append("block_pipeline")
    even = make_plan(pb.Job(id="j2", request=request(num_frames=81, strategy="block_pipeline")),
                     [pb.WorkerInfo(id=w, speed=1.0) for w in "abcd"], model, timeout_seconds=30)
    assert [(r.start, r.end) for r in even.layers] == [(0, 8), (8, 16), (16, 23), (23, 30)]  # remainder first
    assert not even.clips and even.num_latent_frames == 21
    assert (even.block_pipeline.block_frames, even.block_pipeline.context_frames) == \
        (BLOCK_PIPELINE_DEFAULTS["block_frames"], BLOCK_PIPELINE_DEFAULTS["context_frames"])
    fast_first = make_plan(pb.Job(id="j3", request=request(num_frames=0)),  # unbounded: block_pipeline
                           [pb.WorkerInfo(id="a", speed=3.0), pb.WorkerInfo(id="b", speed=1.0)], model, 30)
    assert fast_first.strategy == "block_pipeline" and fast_first.num_latent_frames == 0
    assert [(r.start, r.end) for r in fast_first.layers] == [(0, 23), (23, 30)]  # 22.5: by measured speed
    assert max_workers(request(num_frames=0), model) == 30
    assert max_workers(request(num_frames=17, strategy="exact"), model) == 5


def test_block_pipeline_default_context_shrinks_to_a_small_block():
    small = specs.resolve_options(BLOCK_PIPELINE, request(block_pipeline=pb.BlockPipelineOptions(block_frames=2)))
    assert (small.block_frames, small.context_frames) == (2, 2)
    none = specs.resolve_options(BLOCK_PIPELINE, request(block_pipeline=pb.BlockPipelineOptions(context_frames=0)))
    assert (none.block_frames, none.context_frames) == (BLOCK_PIPELINE_DEFAULTS["block_frames"], 0)


# -- a job's mesh (RenderPlan.parallel, issue 22) ------------------------------------------------

def _members(n: int, memory: int = 0, weights: int = 0, speeds=None) -> list[pb.WorkerInfo]:
    return [pb.WorkerInfo(id=f"w{r}", speed=(speeds or [1.0] * n)[r], memory_bytes=memory, denoiser_bytes=weights)
            for r in range(n)]


def test_cfg_parallel_makes_two_branches_of_split_ranks():
    req = request(num_frames=33, guidance_scale=5.0, cfg_parallel=True, num_workers=4)  # 9 latent frames
    plan = make_plan(pb.Job(id="j", request=req), _members(4, speeds=[1.0, 1.0, 3.0, 1.0]), WAN, 60)
    assert (plan.parallel.cfg, specs.split_ranks(plan)) == (2, 2)
    assert [specs.branch_of(plan, r) for r in range(4)] == [0, 0, 1, 1]
    assert [specs.split_rank(plan, r) for r in range(4)] == [0, 1, 0, 1]
    assert [(c.start, c.end) for c in plan.clips] == [(0, 5), (5, 9)]  # one clip per split rank, slowest branch's speed
    assert "cfg 2 x 2: asked" in plan.parallel.why
    assert specs.check_plan(plan, WAN).name == "exact"
    # the conditional branch's ranks (0, 1) upload the clips
    assert [specs.decoding_rank(plan, f) for f in (0, 4, 5, 8)] == [0, 0, 1, 1]


def test_weights_are_sharded_where_they_crowd_a_worker_unless_the_request_says():
    req = request(num_frames=17)
    big = make_plan(pb.Job(id="j", request=req), _members(2, memory=24 << 30, weights=28 << 30), WAN, 60)
    assert big.parallel.shard_weights and "28.0 GiB exceed 50% of a worker's 24.0 GiB" in big.parallel.why
    small = make_plan(pb.Job(id="j", request=req), _members(2, memory=24 << 30, weights=2 << 30), WAN, 60)
    assert not small.parallel.shard_weights and "are within" in small.parallel.why
    unknown = make_plan(pb.Job(id="j", request=req), _members(2), WAN, 60)
    assert not unknown.parallel.shard_weights and "unknown" in unknown.parallel.why
    asked = request(num_frames=17, shard_weights=False)
    assert not make_plan(pb.Job(id="j", request=asked), _members(2, 24 << 30, 28 << 30), WAN, 60).parallel.shard_weights
    alone = make_plan(pb.Job(id="j", request=req), _members(1, 24 << 30, 28 << 30), WAN, 60)
    assert not alone.parallel.shard_weights  # one rank has nobody to share with


def test_plan_checks_refuse_a_mesh_the_strategy_or_request_cannot_run():
    req = request(num_frames=17, guidance_scale=5.0, cfg_parallel=True, num_workers=2)
    plan = make_plan(pb.Job(id="j", request=req), _members(2), WAN, 60)
    odd = pb.RenderPlan(); odd.CopyFrom(plan); odd.world_size = 3
    with pytest.raises(specs.SpecError, match="world_size"):
        specs.check_plan(odd, WAN)
    unguided = pb.RenderPlan(); unguided.CopyFrom(plan); unguided.request.guidance_scale = 1.0
    with pytest.raises(specs.SpecError, match="parallel.cfg"):
        specs.check_plan(unguided, WAN)
    assert [specs.usable_workers(specs.STRATEGY_SPECS["exact"], req, WAN, n) for n in range(1, 6)] == [0, 2, 2, 4, 4]
