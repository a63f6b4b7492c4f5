"""Benchmark the per-worker savers (Streamlined Inference): peak memory and time of the feature
slicer against diffusers, and speed and quality of the step caches against full computation.

Why: the slicer promises peak activation memory <= 1/3 of vanilla diffusers (and below
diffusers' own savers) at <= 1.1x the unsliced time; a step cache promises >= 1.4x speed at its
documented default, at a quality cost this script measures (PSNR of the decoded video vs the
full run, latent relative L2; the presets have random weights, so say both). Every row is one
fresh spawned process (2 for the composed row), 1 thread, denoise + decode from the same noise;
peak = the process's peak RSS during the run (VmHWM, reset once the model is loaded) minus its RSS then.

    python -m bench.bench_savers                    # bench-unet3d, bench-animatediff, bench-wan
    python -m bench.bench_savers --models tiny-unet3d,tiny-wan --size 64 --frames 9 --wan-frames 17 \\
        --steps 2 --cache-steps 4 --output /tmp/s.md  # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import math
import time

from bench.common import DOCS, GUIDANCE, PROMPT, SEED
from bench.procs import run_ranks, stop_ranks_on_exit
from bench.report import busy_warning, load, machine, write_section
from bench.runners import open_mesh, plan_for

DIFFUSERS_SAVERS = "unet.enable_forward_chunking(1, dim=1) + vae.enable_slicing(); Wan: vae.enable_tiling()"


def _diffusers(cfg: dict, model) -> dict:
    """The family's own pipeline __call__ (vanilla, or with diffusers' savers on)."""
    import torch

    from clipmesh.worker.noise import initial_noise

    pipe, req = model.pipe, cfg
    if cfg["kind"] == "diffusers-savers":
        if model.family == "wan":
            pipe.vae.enable_tiling()
        else:
            pipe.unet.enable_forward_chunking(chunk_size=1, dim=1)
            pipe.vae.enable_slicing()
    cond, uncond = model.encode_prompt(PROMPT, "", GUIDANCE)
    channels, h, w = model.latent_shape(req["size"], req["size"])
    latent = (cfg["frames"] - 1) // model.temporal_stride + 1
    noise = initial_noise(SEED, 0, latent, channels, h, w) * pipe.scheduler.init_noise_sigma
    rss_loaded, began = _reset_peak(), time.perf_counter()
    with torch.no_grad():
        video = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=noise, num_frames=cfg["frames"],
                     height=req["size"], width=req["size"], num_inference_steps=cfg["steps"],
                     guidance_scale=GUIDANCE, output_type="np").frames[0]
    return dict(wall=time.perf_counter() - began, rss_loaded=rss_loaded, rss_peak=_peak(), full=cfg["steps"],
                frames=(video * 255).round().clip(0, 255).astype("uint8"))


def _rank(cfg: dict, rank: int, port_q) -> dict:
    import numpy as np
    import torch

    from clipmesh.v1 import clipmesh_pb2 as pb
    from clipmesh.worker.adapters import load_adapter
    from clipmesh.worker.render import render

    model = load_adapter(cfg["folder"], "cpu", torch.float32)
    if cfg["kind"].startswith("diffusers"):
        return dict(rank=rank, **_diffusers(cfg, model))
    savers = pb.SaverOptions(slice_chunks=cfg.get("slice", 0), step_cache=cfg.get("cache", "off"))
    plan = plan_for(cfg, model.model_info(cfg["model"]), cfg["kind"], savers=savers)
    pieces, latents, full = [], [], []
    rss_loaded = _reset_peak()
    with open_mesh(rank, cfg["workers"], port_q, plan.group_name) as mesh:
        mesh.any(False)
        began = time.perf_counter()
        render(model, plan, rank, mesh, on_step=lambda r: full.append(r.full_pass), on_frames=pieces.append,
               on_latents=lambda p: latents.append((p.start, p.latents.numpy())))
        wall = time.perf_counter() - began
    pieces.sort(key=lambda p: p.first_frame)
    return dict(rank=rank, wall=wall, rss_loaded=rss_loaded, rss_peak=_peak(), full=sum(full),
                frames=np.concatenate([p.frames for p in pieces]) if pieces else None,
                latents=np.concatenate([x for _, x in sorted(latents, key=lambda item: item[0])], axis=2))


def _reset_peak() -> float:
    """The process's RSS now (MB), with its peak reset to it: loading's own peak (temporary
    copies of the weights) must not hide the run's (ru_maxrss counts from the process start)."""
    from clipmesh.worker.peak_memory import PeakMemory

    PeakMemory("cpu").reset()
    return _peak()


def _peak() -> float:
    from clipmesh.worker.peak_memory import PeakMemory

    return PeakMemory("cpu").peak() / 2**20


def _run(cfg: dict, workers: int = 1) -> dict:
    out = run_ranks(_rank, cfg, workers, f"savers-{cfg['model']}-{cfg['kind']}")
    if out.error:
        raise SystemExit(f"{cfg['model']} {cfg['kind']}: {out.error}")
    ranks = out.ranks
    import numpy as np

    frames = np.concatenate([r["frames"] for r in ranks if r["frames"] is not None])
    latents = np.concatenate([r["latents"] for r in ranks if r.get("latents") is not None], axis=2) \
        if any(r.get("latents") is not None for r in ranks) else None
    return dict(wall=max(r["wall"] for r in ranks), peak=max(r["rss_peak"] - r["rss_loaded"] for r in ranks),
                full=ranks[0]["full"], frames=frames, latents=latents)


def _psnr(a, b) -> float:
    mse = float(((a.astype("float64") - b.astype("float64")) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def _rel_l2(a, b) -> float:
    import numpy as np

    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def memory_rows(model: str, folder: str, frames: int, size: int, steps: int) -> list[str]:
    base = dict(folder=folder, model=model, frames=frames, size=size, steps=steps, workers=1)
    runs = {kind: _run(dict(base, kind=kind)) for kind in ("diffusers", "diffusers-savers")}
    for chunks in (0, 2, 4, 8):
        runs[f"clipmesh, {chunks} chunks" if chunks else "clipmesh, unsliced"] = _run(dict(base, kind="exact",
                                                                                           slice=chunks))
    vanilla, unsliced = runs["diffusers"], runs["clipmesh, unsliced"]
    rows = []
    for name, r in runs.items():
        rows.append(f"| {model} | {frames} | {name} | {r['peak']:.0f} | {r['peak'] / vanilla['peak']:.2f} | "
                    f"{r['wall']:.1f} | {r['wall'] / unsliced['wall']:.2f} | {_psnr(r['frames'], vanilla['frames']):.1f} |")
        print(rows[-1], flush=True)
    return rows


def cache_rows(model: str, folder: str, frames: int, size: int, steps: int, caches: list[str],
               strategy: str = "exact", workers: int = 1, slice_chunks: int = 0) -> list[str]:
    base = dict(folder=folder, model=model, frames=frames, size=size, steps=steps, workers=workers, kind=strategy)
    full = _run(base, workers)
    rows = []
    for cache in ["off", *caches]:
        r = full if cache == "off" and not slice_chunks else _run(dict(base, cache=cache, slice=slice_chunks), workers)
        label = f"{strategy} x{workers}" + (f", {slice_chunks} chunks" if slice_chunks else "")
        rows.append(f"| {model} | {frames} | {label} | {cache} | {r['full']}/{steps} | {r['wall']:.1f} | "
                    f"{full['wall'] / r['wall']:.2f}x | {_psnr(r['frames'], full['frames']):.1f} | "
                    f"{_rel_l2(r['latents'], full['latents']):.2e} |")
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bench-unet3d,bench-animatediff,bench-wan")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--frames", type=int, default=16, help="UNet-family frames")
    parser.add_argument("--wan-frames", type=int, default=129)
    parser.add_argument("--steps", type=int, default=2, help="steps of the memory rows")
    parser.add_argument("--cache-steps", type=int, default=10, help="steps of the step-cache rows")
    parser.add_argument("--output", default=str(DOCS / "bench-savers.md"))
    args = parser.parse_args()
    stop_ranks_on_exit()
    from clipmesh.presets import PRESETS, model_folder

    at_start, memory, caches = load(), [], []
    for model in args.models.split(","):
        folder, family = str(model_folder(model)), PRESETS[model]["limits"]["family"]
        frames = args.wan_frames if family == "wan" else args.frames
        memory += memory_rows(model, folder, frames, args.size, args.steps)
        rules = ["fbc:0.05", "taylorseer:3"] if family == "wan" else ["every:2", "every:3", "auto"]
        caches += cache_rows(model, folder, frames, args.size, args.cache_steps, rules)
        if family == "wan":  # composed: a strategy, the slicer and a cache at once
            caches += cache_rows(model, folder, frames, args.size, args.cache_steps, ["taylorseer:3"],
                                 strategy="clip_parallel", workers=2, slice_chunks=4)
    text = "\n".join([
        "## Savers: feature slicer and step caches", "",
        f"`python -m bench.bench_savers` on {machine()}, {datetime.date.today()}; 1 thread per process, fp32, "
        f"{args.size}x{args.size}, CFG {GUIDANCE}, denoise and decode. Random-weight presets: PSNR compares "
        "videos of noise, so the latent relative L2 is there too.", busy_warning(at_start), "",
        f"### Peak memory ({args.steps} steps; diffusers' savers: {DIFFUSERS_SAVERS})", "",
        "| model | frames | row | peak MB over the loaded model | vs diffusers | seconds | vs unsliced | "
        "PSNR vs diffusers (dB) |", "|---|---:|---|---:|---:|---:|---:|---:|", *memory, "",
        f"### Step caches ({args.cache_steps} steps; off = full computation)", "",
        "| model | frames | run | cache | full passes | seconds | speed-up | PSNR vs full (dB) | latent rel. L2 |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|", *caches])
    write_section(args.output, "savers", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
