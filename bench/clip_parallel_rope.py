"""Measure clip_parallel's global-frame RoPE policies on bench-wan (docs/clip-parallel-rope.md).

Why: a Wan query frame sees the G global frames at some temporal RoPE position; their true
positions may lie farther away than any distance the model was trained on. With random-weight
presets nothing is "trained", so the measurable proxy is how closely clip_parallel reproduces
the exact full-attention model (`exact`, = vanilla) at and just above the native length, where
full attention is the model's own behaviour. Relative L2 errors against `exact`:
  - the first block's self-attention output (same input on both sides, so it isolates the
    attention approximation; with random weights the residual stream dominates the model's
    output and dilutes every difference there), in the global phase, the local phase, and
    without phase bias;
  - the transformer output of one call in the global phase;
  - the final latents of a short denoise that crosses the phase switch.

One process, a world of one (clip_parallel's result does not depend on the worker count:
the tests check N=2,3 are bit-identical to N=1), 1 thread.

    python -m bench.clip_parallel_rope --latent 21,25,31,41 --size 128
    python -m bench.clip_parallel_rope --latent 21 --size 32 --steps 2   # smoke test
"""

from __future__ import annotations

import argparse
import time

import torch

from clipmesh.plan import num_output_frames
from clipmesh.specs import GLOBAL_ROPE_POLICIES
from clipmesh.v1 import clipmesh_pb2 as pb

POLICIES = list(GLOBAL_ROPE_POLICIES)


def plan_for(latent, size, steps, strategy, halo, num_global, bias, group, policy="true"):
    req = pb.SubmitJobRequest(prompt="a red kite over a windy beach", num_frames=num_output_frames(latent, 4),
                              height=size, width=size, num_inference_steps=steps, guidance_scale=1.0, seed=3,
                              model="bench-wan", strategy=strategy)
    opts = pb.ClipParallelOptions(local_halo=halo, global_frames=num_global, global_phase=0.5, phase_bias=bias,
                                  entropy_scaling=False, noise_reschedule=False, spectral_blend=False,
                                  global_rope=policy)
    return pb.RenderPlan(request=req, strategy=strategy, world_size=1, num_latent_frames=latent,
                         clips=[pb.ClipRange(start=0, end=latent)], start_step=0,
                         group_name=group, timeout_seconds=600, clip_parallel=opts)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--latent", default="21,25,31,41")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4)  # 999, 900 | 750, 500: global_phase 0.5
    ap.add_argument("--halo", type=int, default=10)
    ap.add_argument("--global-frames", type=int, default=16)
    ap.add_argument("--coherence", type=float, default=0.0,
                    help="input frames share this fraction of their noise (0: i.i.d. frames as at the first step; "
                         "0.9: temporally coherent content, which makes attention depend on RoPE distance)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from clipmesh.presets import model_folder
    from clipmesh.worker.adapters import load_adapter
    from clipmesh.worker.mesh import Mesh, host_store
    from clipmesh.worker.job import Job
    from clipmesh.worker.noise import initial_noise
    from clipmesh.worker.patches import Patches
    from clipmesh.worker.render import denoise
    from clipmesh.worker.strategies import get_strategy

    model = load_adapter(model_folder("bench-wan"), "cpu", torch.float32)
    store, port = host_store("127.0.0.1", timeout_s=600)
    mesh = Mesh.open("127.0.0.1", port, 0, 1, "rope-bench", timeout_s=600, store=store)
    cond, _ = model.encode_prompt("a red kite over a windy beach", "", 1.0)
    c, h, w = model.latent_shape(args.size, args.size)
    print(f"coherence {args.coherence}, {args.size}x{args.size}, P={args.halo}, G={args.global_frames}")
    print(f"| latent F | policy | max presented distance | attn L0, t=999 (global phase) | attn L0, t=600 (local phase) "
          f"| attn L0, no bias | output, t=999 | final latents, {args.steps} steps |")
    print("|---|---|---|---|---|---|---|---|")
    for latent in [int(x) for x in args.latent.split(",")]:
        x = initial_noise(3, 0, latent, c, h, w)
        if args.coherence:  # every frame = coherence * one shared frame + the rest its own noise, unit variance
            shared = initial_noise(4, 0, 1, c, h, w)
            x = args.coherence * shared + (1 - args.coherence ** 2) ** 0.5 * x

        def call(plan, t):
            """(first block's attn1 output, transformer output) of one call."""
            seen = []
            hook = model.self_attentions()[0].register_forward_hook(lambda mod, args, out: seen.append(out))
            try:
                with Patches() as patches, torch.no_grad():
                    get_strategy(plan.strategy).install(Job(model, plan, 0, mesh), patches)
                    patches.reset_state()
                    patches.begin_step(t)
                    out = model.denoiser(hidden_states=x, timestep=torch.tensor([t]), encoder_hidden_states=cond,
                                         return_dict=False)[0]
            finally:
                hook.remove()
            return seen[0], out

        def run(plan):
            return denoise(model, plan, 0, mesh)

        exact = plan_for(latent, args.size, args.steps, "exact", 0, 0, 0.0, "x")
        ref = {t: call(exact, t) for t in (999.0, 600.0)}
        ref_final = run(exact)
        rows = [(p, args.global_frames) for p in POLICIES] + [("(G=0, window only)", 0)]
        for policy, g in rows:
            began = time.perf_counter()
            pol = policy if policy in POLICIES else "true"
            cp = plan_for(latent, args.size, args.steps, "clip_parallel", args.halo, g, 10.0, "c", pol)
            cp0 = plan_for(latent, args.size, args.steps, "clip_parallel", args.halo, g, 0.0, "c0", pol)
            (a_global, o_global), (a_local, _), (a_nobias, _) = call(cp, 999.0), call(cp, 600.0), call(cp0, 999.0)
            errs = [rel(a_global, ref[999.0][0]), rel(a_local, ref[600.0][0]), rel(a_nobias, ref[999.0][0]),
                    rel(o_global, ref[999.0][1]), rel(run(cp), ref_final)]
            reach = {"true": latent - 1, "native": min(latent - 1, 20), "clamp": args.halo, "query": 0}.get(policy, "-")
            print(f"| {latent} | {policy} | {reach} | " + " | ".join(f"{e:.4f}" for e in errs) + " |"
                  f"  <!-- {time.perf_counter() - began:.0f}s -->", flush=True)
    mesh.close()


if __name__ == "__main__":
    main()
