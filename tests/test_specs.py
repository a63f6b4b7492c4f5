"""The strategy specs: the table itself, check_plan's refusals, and the planner, validation,
presets and CLI agreeing with the specs (pure Python: no torch, no daemons)."""

import pytest

from clipmesh import specs
from clipmesh.cli import build_parser, _request_fields
from clipmesh.coordinator.errors import InvalidArgument
from clipmesh.coordinator.planner import make_plan
from clipmesh.coordinator.validate import validate_request
from clipmesh.presets import PRESETS, model_limits
from clipmesh.specs import FRAMES, LAYERS, STRATEGY_SPECS, SpecError, StrategySpec, check_plan
from clipmesh.v1 import clipmesh_pb2 as pb

WAN = pb.ModelInfo(**model_limits("tiny-wan"))          # 4 layers, 2 heads, stride 4
UNET3D = pb.ModelInfo(**model_limits("tiny-unet3d"))
ANIMATEDIFF = pb.ModelInfo(**model_limits("tiny-animatediff"))  # exact only: 32 frames of motion positions
MODELS = {"wan": WAN, "unet3d": UNET3D}
RANGED = [(spec, o) for spec in STRATEGY_SPECS.values() for o in spec.options if o.low is not None]
CHOSEN = [(spec, o) for spec in STRATEGY_SPECS.values() for o in spec.options if o.choices]


def request(**kw) -> pb.SubmitJobRequest:
    return pb.SubmitJobRequest(**{"prompt": "p", "num_frames": 17, "height": 32, "width": 32, "num_inference_steps": 2,
                                  "guidance_scale": 5.0, "fps": 8, "model": "tiny-wan", **kw})


def plan_for(req: pb.SubmitJobRequest, model: pb.ModelInfo = WAN, speeds=(1.0, 1.0)) -> pb.RenderPlan:
    members = [pb.WorkerInfo(id=f"w{i}", speed=s) for i, s in enumerate(speeds)]
    return make_plan(pb.Job(id="j", request=req), members, model, timeout_seconds=30)


def refused(plan: pb.RenderPlan, model: pb.ModelInfo = WAN) -> SpecError:
    with pytest.raises(SpecError) as err:
        check_plan(plan, model)
    assert str(err.value).startswith(f"{err.value.field}: ")
    return err.value


def options_with(spec: StrategySpec, model: pb.ModelInfo, **values):
    return specs.resolve_options(spec, pb.SubmitJobRequest(**{spec.options_field: spec.options_message(**values)}),
                                 model)


@pytest.fixture
def ulysses():
    """The heads-split spec, on a tiny-wan with 4 heads."""
    spec = specs.spec_named("ulysses")
    assert spec.splits_heads and spec.partition == FRAMES
    model = pb.ModelInfo(); model.CopyFrom(WAN); model.attention_heads = 4
    return spec, model


# -- the table ---------------------------------------------------------------
def test_table_is_well_formed():
    assert list(STRATEGY_SPECS)[0] == specs.DEFAULT_STRATEGY == "exact"
    flags = [o.flag for spec in STRATEGY_SPECS.values() for o in spec.options]
    assert len(flags) == len(set(flags))  # the CLI puts every strategy's flags in one namespace
    for name, spec in STRATEGY_SPECS.items():
        assert spec.name == name and spec.partition in (FRAMES, LAYERS) and spec.families
        if spec.options:
            for message in (pb.SubmitJobRequest, pb.RenderPlan):
                assert spec.options_field in message.DESCRIPTOR.fields_by_name
            fields = spec.options_message().DESCRIPTOR.fields_by_name
            assert [o.name for o in spec.options] == list(fields)  # every field of the message has a spec
            for o in spec.options:  # the spec's type is the field's; choices (str) and ranges (numbers) apart
                assert type(getattr(spec.options_message(), o.name)) is o.type
                assert (o.type is str) == bool(o.choices) and not (o.choices and o.low is not None)
        if spec.min_clip_option:
            assert spec.partition == FRAMES and spec.option(spec.min_clip_option).type is int
        for family, why in spec.refused:  # a refusal is for a family the spec does not run on, with a reason
            assert family not in spec.families and why and spec.refusal(family) == why
    assert [s.name for s in STRATEGY_SPECS.values() if s.streams] == ["block_pipeline"]
    assert len({hash(spec) for spec in STRATEGY_SPECS.values()}) == len(STRATEGY_SPECS)  # frozen, hashable


@pytest.mark.parametrize("spec,option", RANGED, ids=[f"{s.name}.{o.name}" for s, o in RANGED])
def test_every_default_lies_within_its_range(spec, option):
    for family in spec.families:
        resolved = specs.resolve_options(spec, pb.SubmitJobRequest(), MODELS[family])
        low, high = option.bounds(resolved)
        assert low <= option.default_for(family) <= high
        assert low <= getattr(resolved, option.name) <= high


def test_defaults_per_family_and_precedence():
    cp, bp = STRATEGY_SPECS["clip_parallel"], STRATEGY_SPECS["block_pipeline"]
    assert specs.resolve_options(cp, request(), WAN).local_halo == 10
    assert specs.resolve_options(cp, request(), UNET3D).local_halo == 8
    model = pb.ModelInfo(); model.CopyFrom(UNET3D); model.clip_parallel_defaults.local_halo = 5
    assert specs.resolve_options(cp, request(), model).local_halo == 5
    assert specs.resolve_options(cp, request(clip_parallel=pb.ClipParallelOptions(local_halo=3)), model).local_halo == 3
    small = specs.resolve_options(bp, request(block_pipeline=pb.BlockPipelineOptions(block_frames=3)), WAN)
    assert (small.block_frames, small.context_frames) == (3, 3)  # the default context shrinks to the block
    assert specs.resolve_options(STRATEGY_SPECS["exact"], request(), WAN) is None


def test_presets_list_the_strategies_of_their_family():
    assert specs.strategies_for("wan") == ["exact", "clip_parallel", "block_pipeline", "ulysses"]
    assert specs.strategies_for("unet3d") == ["exact", "clip_parallel"]
    assert specs.strategies_for("animatediff") == ["exact"]
    for name, preset in PRESETS.items():
        limits = preset["limits"]
        assert limits["strategies"] == specs.strategies_for(limits["family"]), name
        assert limits["attention_heads"] >= 1
    assert (WAN.num_layers, WAN.attention_heads) == (4, 2)  # tiny-wan's transformer config
    assert UNET3D.attention_heads == 8  # transformer_in's 8; blocks of 32 and 64 channels at head_dim 4: 8, 16


def test_clip_lengths():
    plan = pb.RenderPlan(clips=[pb.ClipRange(start=0, end=3), pb.ClipRange(start=3, end=5)])
    assert specs.clip_lengths(plan) == [3, 2]


# -- check_plan: every plan the planner makes passes ----------------------------
@pytest.mark.parametrize("fields,model,speeds", [
    (dict(strategy="exact"), WAN, (1, 1)),
    (dict(strategy="exact", num_frames=1), WAN, (1,)),
    (dict(num_frames=129, strategy="clip_parallel"), WAN, (1, 3)),   # 33 latent, lifted to the halo
    (dict(num_frames=17, strategy="clip_parallel"), WAN, (1, 1, 1)),  # 5 frames: the halo cannot be honoured
    (dict(num_frames=40, model="tiny-unet3d"), UNET3D, (2, 1, 1)),    # clip_parallel chosen (> 16 native)
    (dict(num_frames=0), WAN, (3, 1)),                                # unbounded: block_pipeline
    (dict(num_frames=81, strategy="block_pipeline"), WAN, (1, 1, 1, 1)),
])
def test_planner_plans_pass_check_plan(fields, model, speeds):
    req = request(**fields)
    validate_request(req, model, [model.name])
    plan = plan_for(req, model, speeds)
    assert check_plan(plan, model) is STRATEGY_SPECS[plan.strategy]


# -- check_plan: each refusal names its field -------------------------------------
def test_check_plan_refuses_an_unknown_strategy_or_family():
    plan = plan_for(request(strategy="exact"))
    plan.strategy = "warp-drive"
    assert refused(plan).field == "strategy"
    plan = plan_for(request(num_frames=0))
    err = refused(plan, UNET3D)
    assert err.field == "model.family" and "wan" in err.detail


def test_a_refused_strategy_says_why_in_validation_and_check_plan():
    req = request(strategy="clip_parallel", model="tiny-animatediff", num_frames=9)
    err = invalid(req, ANIMATEDIFF)
    assert err.field == "strategy" and "position embeddings" in str(err) and "allowed: exact" in str(err)
    plan = plan_for(request(strategy="clip_parallel", num_frames=9), UNET3D)
    err = refused(plan, ANIMATEDIFF)
    assert err.field == "model.family" and "position embeddings" in err.detail
    assert "unknown strategy" in str(invalid(request(strategy="ulysses"), UNET3D))  # not refused: not offered


def test_check_plan_refuses_clips_that_do_not_tile():
    plan = plan_for(request(strategy="exact"))  # 5 latent frames: (0, 3), (3, 5)
    for clips in ([(0, 3), (4, 5)], [(0, 3), (3, 4)], [(0, 5), (5, 5)], [(3, 5), (0, 3)]):
        del plan.clips[:]
        plan.clips.extend(pb.ClipRange(start=s, end=e) for s, e in clips)
        err = refused(plan)
        assert err.field == "clips" and "[0, 5)" in err.detail and "2 ranks" in err.detail
    plan = plan_for(request(strategy="exact"))
    plan.world_size = 3
    assert refused(plan).field == "clips"


def test_check_plan_refuses_layers_that_do_not_tile():
    plan = plan_for(request(num_frames=0))  # tiny-wan: 4 layers over 2 ranks
    del plan.layers[-1]
    err = refused(plan)
    assert err.field == "layers" and "[0, 4)" in err.detail


def test_check_plan_refuses_more_ranks_than_the_partition_allows():
    plan = plan_for(request(strategy="exact"), speeds=(1,) * 5)
    plan.world_size = 6
    plan.clips.add(start=5, end=5)
    err = refused(plan)
    assert err.field == "world_size" and "[1, 5]" in err.detail  # one rank per latent frame
    plan = plan_for(request(num_frames=0), speeds=(1,) * 4)
    plan.world_size = 5
    assert refused(plan).field == "world_size"  # one rank per transformer block: 4
    plan.world_size = 0
    assert refused(plan).field == "world_size"


def test_check_plan_refuses_frames_that_do_not_match_the_request():
    plan = plan_for(request(strategy="exact"))
    plan.num_latent_frames = 6
    err = refused(plan)
    assert err.field == "num_latent_frames" and "5" in err.detail
    plan = plan_for(request(strategy="exact"))
    plan.request.num_frames = 0
    assert refused(plan).field == "request.num_frames"  # only a streaming strategy runs unbounded
    plan.request.num_frames = 18
    assert refused(plan).field == "request.num_frames"  # not 4k+1


@pytest.mark.parametrize("spec,option", RANGED, ids=[f"{s.name}.{o.name}" for s, o in RANGED])
def test_check_plan_refuses_unset_and_out_of_range_options(spec, option):
    req = request(num_frames=129, strategy=spec.name)
    plan = plan_for(req)
    options = getattr(plan, spec.options_field)
    options.ClearField(option.name)
    assert refused(plan).field == f"{spec.options_field}.{option.name}"
    plan = plan_for(req)
    options = getattr(plan, spec.options_field)
    low, high = option.bounds(options)
    setattr(options, option.name, high + 1)
    err = refused(plan)
    assert err.field == f"{spec.options_field}.{option.name}" and f"{high:g}]" in err.detail


def test_check_plan_accepts_clips_shorter_than_the_halo():
    """The halo is the planner's preference, not a limit: a neighbour's halo then comes from the
    ranks beyond it (Mesh.exchange_halos), so the worker runs such a plan."""
    plan = plan_for(request(num_frames=129, strategy="clip_parallel"))  # 33 latent, halo 10
    plan.clips[0].end = plan.clips[1].start = 5
    check_plan(plan, WAN)


def test_check_plan_refuses_workers_that_do_not_divide_the_heads(ulysses):
    spec, model = ulysses
    req = request(num_frames=17, strategy=spec.name)  # 5 latent frames, 4 heads
    validate_request(req, model, [model.name])
    assert specs.worker_limit(spec, req, model) == 4
    assert [specs.usable_workers(spec, req, model, n) for n in range(6)] == [0, 1, 2, 2, 4, 4]
    check_plan(plan_for(req, model, speeds=(1, 1)), model)
    err = refused(plan_for(req, model, speeds=(1, 1, 1)), model)
    assert err.field == "world_size" and "4 attention heads" in err.detail
    model.attention_heads = 0
    assert refused(plan_for(req, model, speeds=(1, 1)), model).field == "model.attention_heads"


# -- validation agrees with the specs -----------------------------------------------
def invalid(req: pb.SubmitJobRequest, model: pb.ModelInfo = WAN) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as err:
        validate_request(req, model, [model.name])
    return err.value


@pytest.mark.parametrize("spec,option", RANGED, ids=[f"{s.name}.{o.name}" for s, o in RANGED])
def test_range_ends_are_accepted_and_beyond_refused_by_validation_and_check_plan(spec, option):
    field = f"{spec.options_field}.{option.name}"
    others = {"block_frames": 64} if option.high == "block_frames" else {}  # the largest block: a static bound
    low, high = option.bounds(options_with(spec, WAN, **others))
    for value in (low, high):
        req = request(num_frames=129, strategy=spec.name, **{spec.options_field: spec.options_message(
            **others, **{option.name: value})})
        validate_request(req, WAN, ["tiny-wan"])
        plan = plan_for(req)
        assert getattr(getattr(plan, spec.options_field), option.name) == value  # the planner keeps it
        check_plan(plan, WAN)
    for value in (low - 1, high + 1):
        req = request(num_frames=129, strategy=spec.name, **{spec.options_field: spec.options_message(
            **others, **{option.name: value})})
        err = invalid(req)
        assert err.field == field and f"[{low:g}, {high:g}]" in str(err)


@pytest.mark.parametrize("spec,option", CHOSEN, ids=[f"{s.name}.{o.name}" for s, o in CHOSEN])
def test_choices_are_accepted_and_others_refused_by_validation_and_check_plan(spec, option):
    field = f"{spec.options_field}.{option.name}"
    for family, model in MODELS.items():
        assert option.default_for(family) in option.choices
        assert getattr(specs.resolve_options(spec, pb.SubmitJobRequest(), model), option.name) in option.choices
    for value in option.choices:
        req = request(num_frames=129, strategy=spec.name, **{spec.options_field: spec.options_message(
            **{option.name: value})})
        validate_request(req, WAN, ["tiny-wan"])
        plan = plan_for(req)
        assert getattr(getattr(plan, spec.options_field), option.name) == value  # the planner keeps it
        check_plan(plan, WAN)
    for value in ("", option.choices[0].upper(), "x" * 5000):
        req = request(num_frames=129, strategy=spec.name, **{spec.options_field: spec.options_message(
            **{option.name: value})})
        err = invalid(req)
        assert err.field == field and ", ".join(option.choices) in str(err) and len(str(err)) < 300
        plan = plan_for(request(num_frames=129, strategy=spec.name))
        setattr(getattr(plan, spec.options_field), option.name, value)
        err = refused(plan)
        assert err.field == field and ", ".join(option.choices) in err.detail
    plan = plan_for(request(num_frames=129, strategy=spec.name))
    getattr(plan, spec.options_field).ClearField(option.name)
    assert refused(plan).field == field


def test_a_bound_by_another_option_follows_it_in_validation():
    block = lambda **kw: request(block_pipeline=pb.BlockPipelineOptions(**kw))  # noqa: E731
    validate_request(block(block_frames=2, context_frames=2), WAN, ["tiny-wan"])
    assert invalid(block(block_frames=2, context_frames=3)).field == "block_pipeline.context_frames"
    validate_request(block(context_frames=8), WAN, ["tiny-wan"])  # the default block: 8
    assert invalid(block(context_frames=9)).field == "block_pipeline.context_frames"


def test_worker_caps_and_streaming_follow_the_spec(ulysses):
    spec, model = ulysses
    validate_request(request(num_workers=5, strategy="exact"), WAN, ["tiny-wan"])    # 5 latent frames
    assert invalid(request(num_workers=6, strategy="exact")).field == "num_workers"
    validate_request(request(num_workers=4, num_frames=0), WAN, ["tiny-wan"])        # 4 layers
    assert invalid(request(num_workers=5, num_frames=0)).field == "num_workers"
    assert invalid(request(num_frames=0), UNET3D).field == "num_frames"              # no streaming spec
    validate_request(request(num_frames=specs.MAX_STREAM_FRAMES, strategy="block_pipeline"), WAN, ["tiny-wan"])
    assert invalid(request(num_frames=WAN.max_frames + 4, strategy="exact")).field == "num_frames"
    validate_request(request(num_workers=4, strategy=spec.name), model, ["tiny-wan"])
    err = invalid(request(num_workers=3, strategy=spec.name), model)
    assert err.field == "num_workers" and "divide" in str(err)


def test_choose_spec_follows_the_table():
    assert specs.choose_spec(request(num_frames=81), WAN).name == "exact"          # 21 latent: native
    assert specs.choose_spec(request(num_frames=85), WAN).name == "clip_parallel"
    assert specs.choose_spec(request(num_frames=0), WAN).name == "block_pipeline"
    assert specs.choose_spec(request(num_frames=10), WAN).name == "exact"           # bad length: validation says so
    with pytest.raises(SpecError, match="^strategy: "):
        specs.choose_spec(request(strategy="warp-drive"), WAN)


# -- the CLI reads the specs ------------------------------------------------------
def test_cli_has_a_flag_per_option_and_fills_the_messages():
    parser = build_parser()
    argv = ["submit", "x"]
    for spec in STRATEGY_SPECS.values():
        for o in spec.options:
            argv += [o.flag] if o.type is bool else [o.flag, o.choices[-1] if o.choices else "2"]
    fields = _request_fields(parser.parse_args(argv))
    for spec in STRATEGY_SPECS.values():
        if spec.options_field:
            message = fields[spec.options_field]
            assert all(message.HasField(o.name) for o in spec.options)
    unset = _request_fields(parser.parse_args(["submit", "x"]))
    assert not any(unset[s.options_field].ListFields() for s in STRATEGY_SPECS.values() if s.options_field)
    # a bool option that is on by default (entropy scaling) can be turned off: --no-<flag>
    off = _request_fields(parser.parse_args(["submit", "x", "--no-entropy-scaling"]))["clip_parallel"]
    assert off.HasField("entropy_scaling") and not off.entropy_scaling
    assert STRATEGY_SPECS["clip_parallel"].option("entropy_scaling").default is True
    with pytest.raises(SystemExit):
        parser.parse_args(["submit", "x", "--strategy", "warp-drive"])
    for spec, option in CHOSEN:  # a flag with choices refuses others
        assert getattr(parser.parse_args(["submit", "x", option.flag, option.choices[0]]), option.name) \
            == option.choices[0]
        with pytest.raises(SystemExit):
            parser.parse_args(["submit", "x", option.flag, "warp-drive"])


def test_every_spec_has_its_worker_module_and_every_module_its_spec():
    """The worker finds a strategy by its spec's name (worker/strategies/<name>.py defines
    STRATEGY); read as text, so this stays a torch-free unit test."""
    import ast
    import pathlib

    folder = pathlib.Path(specs.__file__).resolve().parent.parent / "worker" / "strategies"
    modules = {path.stem for path in folder.glob("*.py")
               if any(isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "STRATEGY" for t in node.targets)
                      for node in ast.parse(path.read_text()).body)}
    assert modules == set(STRATEGY_SPECS)


def test_what_the_system_asks_of_a_strategy_is_in_its_spec():
    """Progress, checkpoints and who decodes follow StrategySpec.work, not the plan's shape."""
    for spec in STRATEGY_SPECS.values():
        assert spec.work in (specs.CLIPS, specs.QUEUE)
        assert (spec.work == specs.QUEUE) == (spec.partition == LAYERS)  # today's one queue strategy splits layers
    clips = pb.RenderPlan(strategy="exact", world_size=2, num_latent_frames=9,
                          clips=[pb.ClipRange(start=0, end=5), pb.ClipRange(start=5, end=9)])
    assert specs.checkpoint_frames(clips) == 9
    assert [specs.decoding_rank(clips, f) for f in (0, 4, 5, 8, 9)] == [0, 0, 1, 1, -1]
    queue = pb.RenderPlan(strategy="block_pipeline", world_size=2, num_latent_frames=40,
                          block_pipeline=pb.BlockPipelineOptions(block_frames=2))
    assert specs.checkpoint_frames(queue) == 1
    run = 2 * specs.DECODE_RUN  # latent frames per run of blocks
    assert [specs.decoding_rank(queue, f) for f in (0, run - 1, run, 2 * run)] == [0, 0, 1, 0]
