"""Step caches: approximate, off by default, under every frames strategy (exact, clip_parallel,
ulysses, ...; block_pipeline is refused: clipmesh.savers.NO_STEP_CACHE). Every rank takes the
same skip/compute decision at every step, so no rank skips a collective its peers wait in (the
skipped modules hold the strategies' all-gathers and halo exchanges). The runner installs one
after the strategy's patches; everything goes through the job's Patches.

Step rehash (`every:K`, `auto:X`; UNet-style families): Streamlined Inference's rehash, the way
DeepCache does it. The adapter's deep_path() says where the denoiser is cut. At a full step
every module runs and the reused module's output (the feature entering the shallow path's last
up block) is kept, one per denoiser call of the step (UNet3D's CFG batch [uncond; cond] is one
call, so one kept feature holds both halves; a family calling twice per step keeps two). At a
rehash step the deep modules' forwards return without running: the reused module its kept
output, the others an empty stand-in of their output's structure, which nothing reads. Steps
are counted from the job's first step, which is always full:

- `every:K`: full passes at steps 0, K, 2K, ...
- `auto:X` (the paper's "key step search", online): after a full step that has a full step
  before it, the ranks measure the relative L2 change of the reused feature between the two,
  over the whole video and every call: sqrt(sum |new - old|^2 / sum |old|^2), the sums taken
  over the ranks (Mesh.all_sum), so the decision is the same on every rank and for any split.
  Divided by the steps between the two it is the feature's drift per step, r. A step n steps
  after the last full step is a rehash step iff n * r < X (the reused feature's estimated
  drift stays below X) and n <= MAX_REHASH. So steps 0 and 1 are full (the first measure needs
  two), and a slowly changing feature is reused up to MAX_REHASH steps in a row.

Diffusers' caches (`fbc:X`, `taylorseer:K`; Wan): `transformer.enable_cache(...)` inside our
loop; the adapter runs each of its two transformer calls in `cache_context("cond" / "uncond")`
(WanAdapter.cache_context, as WanPipeline does), so the state is kept per call, and
`disable_cache()` is recorded as the patch's undo.

- `fbc:X`: FirstBlockCache. Its decision is data-dependent (the first block's residual change
  vs X), so we replace the hook's decision with the same measure over the whole video: the
  ranks sum |residual - previous| and |previous| (Mesh.all_sum) and all compute the remaining
  blocks iff the ratio exceeds X: one decision for every rank, and the one a single worker takes.
- `taylorseer:K`: TaylorSeerCacheConfig(cache_interval=K, disable_cache_before_step=2,
  max_order=1) on the adapter's taylorseer_modules (Wan: every block's attn1, attn2, ffn):
  full passes at steps 0 and 1 (a first-order forecast needs two), then at 3, 3+K, 3+2K, ...;
  those modules' outputs are forecast between (two factors per module and call, in the model's
  dtype). The decision is a call counter, the same on every rank by construction.

A step reports full_pass False when any of its denoiser calls skipped work.
"""

from __future__ import annotations

import functools

import math

import torch

from clipmesh.savers import MAX_REHASH, StepCache, check_step_cache_strategy

TAYLORSEER_WARMUP = 2  # taylorseer: full steps before the first forecast


def install_step_cache(job, patches, cache: StepCache) -> None:
    """Install `cache` on the job's model through `patches` (before any collective)."""
    check_step_cache_strategy(cache, job.plan.strategy)
    if cache.kind in ("every", "auto"):
        StepRehash(job.mesh, job.model.deep_path(), cache).install(patches)
    elif cache.kind in ("fbc", "taylorseer"):
        install_diffusers_cache(job, patches, cache)
    else:
        raise ValueError(f"savers.step_cache: unknown kind {cache.kind!r}")


def stand_in(output):
    """`output`'s structure (tuples, lists) with every tensor an empty one."""
    if isinstance(output, torch.Tensor):
        return output.new_empty(0)
    if isinstance(output, (tuple, list)):
        return type(output)(stand_in(o) for o in output)
    return output


class StepRehash:
    """The rehash state of one job, tracked by its Patches: begin_step decides whether the step is
    full (the same on every rank), the deep modules' forwards follow the decision."""

    def __init__(self, mesh, path, cache: StepCache):
        self.mesh, self.path = mesh, path
        self.every = int(cache.value) if cache.kind == "every" else None
        self.threshold = cache.value if cache.kind == "auto" else None
        self.full_pass = True
        self.step = -1                     # steps begun
        self.last_full = None              # the step of the last full pass
        self.gap = 0                       # steps between the last two full passes (0: only one yet)
        self.rate = None                   # auto: the reused feature's agreed drift per step
        self.change = [0.0, 0.0]           # auto: sum |new - old|^2, sum |old|^2 at this full step
        self.kept: dict[tuple[int, int], object] = {}  # (module, call of the step) -> its last full output
        self.calls: dict[int, int] = {}    # module -> its calls in this step

    def install(self, patches) -> None:
        patches.track(self)
        for index, module in enumerate(self.path.skipped):
            patches.replace_forward(module, self._forward(index, module.forward, module is self.path.reused))

    def begin_step(self, t: float) -> None:
        self.step += 1
        self.calls.clear()
        if self.threshold is not None and self.full_pass and self.gap:
            # the full step just run measured the change since the full step before it: agree on it
            diff, base = self.mesh.all_sum(self.change)
            self.rate = math.sqrt(diff / base) / self.gap if base > 0 else math.inf
        self.full_pass = self.last_full is None or self._full(self.step - self.last_full)
        if self.full_pass:
            self.gap = self.step - self.last_full if self.last_full is not None else 0
            self.last_full, self.change = self.step, [0.0, 0.0]

    def _full(self, since: int) -> bool:
        """Whether a step `since` steps after the last full pass is full."""
        if self.every is not None:
            return since >= self.every
        return self.rate is None or since > MAX_REHASH or since * self.rate >= self.threshold

    def _forward(self, index: int, forward, reused: bool):
        def rehash_forward(*args, **kwargs):
            call = self.calls.get(index, 0)
            self.calls[index] = call + 1
            if not self.full_pass:
                return self.kept[index, call]
            out = forward(*args, **kwargs)
            if reused:
                self._measure(self.kept.get((index, call)), out)
            self.kept[index, call] = out if reused else stand_in(out)
            return out

        return rehash_forward

    def _measure(self, old, new: torch.Tensor) -> None:
        if self.threshold is not None and old is not None:
            self.change[0] += torch.linalg.vector_norm((new - old).float()).item() ** 2
            self.change[1] += torch.linalg.vector_norm(old.float()).item() ** 2


class CacheDecisions:
    """Tracked: whether every denoiser call of the step ran all of the model (full_pass)."""

    full_pass = True

    def begin_step(self, t: float) -> None:
        self.full_pass = True

    def record(self, computed: bool) -> bool:
        self.full_pass = self.full_pass and computed
        return computed


def install_diffusers_cache(job, patches, cache: StepCache) -> None:
    from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig
    from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK
    from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

    decisions = patches.track(CacheDecisions())
    for transformer in job.model.denoisers:  # each expert of a two-expert model keeps its own cache
        if cache.kind == "fbc":
            config, hook_name = FirstBlockCacheConfig(threshold=cache.value), _FBC_LEADER_BLOCK_HOOK
        else:
            if not job.model.taylorseer_modules:
                raise NotImplementedError(f"{job.model.family} models name no modules for TaylorSeer to forecast")
            config = TaylorSeerCacheConfig(cache_interval=int(cache.value), disable_cache_before_step=TAYLORSEER_WARMUP,
                                           max_order=1, taylor_factors_dtype=transformer.dtype,
                                           cache_identifiers=list(job.model.taylorseer_modules))
            hook_name = _TAYLORSEER_CACHE_HOOK
        transformer.enable_cache(config)
        patches.on_remove(functools.partial(disable_cache, transformer))
        hooks = [m._diffusers_hook.get_hook(hook_name) for m in transformer.modules() if hasattr(m, "_diffusers_hook")]
        for hook in filter(None, hooks):
            if cache.kind == "fbc":
                hook._should_compute_remaining_blocks = agreed_first_block(hook, job.mesh, cache.value, decisions)
            else:
                hook._measure_should_compute = recorded(hook._measure_should_compute, decisions)


def disable_cache(transformer) -> None:
    """diffusers' disable_cache, then drop the instance forwards it leaves behind that are only the
    class's own (a forward some other patch installed before stays, for that patch's undo)."""
    transformer.disable_cache()
    for module in transformer.modules():
        forward = module.__dict__.get("forward")
        if getattr(forward, "__self__", None) is module and getattr(forward, "__func__", None) is type(module).forward:
            del module.forward


def agreed_first_block(hook, mesh, threshold: float, decisions: CacheDecisions):
    """FBCHeadBlockHook's decision over the whole video: compute the remaining blocks iff the first
    block's residual changed (mean |r - r_prev| / mean |r_prev|, the sums over every rank) by more
    than `threshold`, or there is no previous residual yet."""

    def should_compute(residual: torch.Tensor) -> bool:
        previous = hook.state_manager.get_state().head_block_residual
        if previous is None:
            local = [1.0, 0.0, 0.0]
        else:
            total = lambda x: x.abs().sum(dtype=torch.float64).item()  # noqa: E731
            local = [0.0, total(residual - previous), total(previous)]
        first, diff, base = mesh.all_sum(local)
        return decisions.record(first > 0 or diff > threshold * base)

    return should_compute


def recorded(decide, decisions: CacheDecisions):
    """TaylorSeerCacheHook's own decision (a call counter: the same on every rank), recorded."""

    def measure_should_compute():
        compute, state = decide()
        decisions.record(compute)
        return compute, state

    return measure_should_compute
