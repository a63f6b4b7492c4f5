"""One patch lifecycle for a job: every attention processor, torch hook and module `forward`
a strategy installs is recorded here and restored by `remove`, in reverse order.

Why one object: a worker loads its model once and serves many jobs, so a job must leave the
model exactly as it found it, also when installing fails half-way. Per-step and per-iteration
state goes through the same object: anything installed (or `track`ed) that defines
`begin_step(t)` or `reset_state()` is called by the runner at every step / every fresh
iteration, so no patch keeps its own counters (diffusers' ModelHook has the same verbs); one
that has `full_pass` says whether the step ran the whole denoiser (step caches).
"""

from __future__ import annotations

_MISSING = object()


class Patches:
    def __init__(self):
        self._undo: list = []      # callables that restore one patch each
        self._stateful: list = []  # objects with begin_step(t) and/or reset_state()

    def track(self, obj):
        """Let `obj` hear begin_step/reset_state (idempotent); returns it."""
        if any(o is obj for o in self._stateful):
            return obj
        if any(hasattr(obj, verb) for verb in ("begin_step", "reset_state", "full_pass")):
            self._stateful.append(obj)
        return obj

    def set_processor(self, attn, processor) -> None:
        """Give one attention module a job-specific processor."""
        stock = attn.processor
        attn.set_processor(processor)
        self._undo.append(lambda: attn.set_processor(stock))
        self.track(processor)

    def forward_hook(self, module, hook) -> None:
        """A torch forward hook on `module` (it may replace the output)."""
        handle = module.register_forward_hook(hook)
        self._undo.append(handle.remove)

    def replace_forward(self, module, forward) -> None:
        """Replace one module *instance*'s forward (never the class)."""
        saved = module.__dict__.get("forward", _MISSING)
        module.forward = forward

        def undo():
            if saved is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.forward = saved
        self._undo.append(undo)
        self.track(forward)

    def on_remove(self, undo) -> None:
        """Call `undo()` when the job's patches are removed (for what is not a processor, hook or
        forward, e.g. a diffusers cache to disable)."""
        self._undo.append(undo)

    def begin_step(self, t: float) -> None:
        for obj in self._stateful:
            if hasattr(obj, "begin_step"):
                obj.begin_step(t)

    @property
    def full_pass(self) -> bool:
        """False when a step cache (anything tracked with `full_pass` False) skipped work this step."""
        return all(getattr(obj, "full_pass", True) for obj in self._stateful)

    def reset_state(self) -> None:
        for obj in self._stateful:
            if hasattr(obj, "reset_state"):
                obj.reset_state()

    def remove(self) -> None:
        """Undo everything, newest first (idempotent)."""
        while self._undo:
            self._undo.pop()()
        self._stateful.clear()

    def __enter__(self) -> "Patches":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
