"""Benchmark the image-to-video condition encode: seconds and peak memory per rank.

Why: WanImageToVideoPipeline encodes [image, zeros x (num_frames - 1)] with the causal VAE in one
call on one process: at 257 frames, 257 full frames through the encoder. clipmesh encodes the
video's head only (worker/adapters/wan_encode.py: every latent frame past the encoder's reach is
the same tensor) and each rank takes its clip from it, exactly. Rows: the pipeline's one call,
and the per-clip encode at 1 and 2 workers (each rank encodes the same head, so 2 workers cost
what 1 does; the saving is against the one call, and it grows with the video). Fresh spawned
processes with 1 thread each; the image is a synthetic disc.

    python -m bench.bench_i2v                        # bench-wan's VAE, 256x256, 257 frames
    python -m bench.bench_i2v --model tiny-wan --size 64 --frames 33 --output /tmp/i.md   # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import time

from bench.common import DOCS
from bench.procs import run_ranks, stop_ranks_on_exit
from bench.report import busy_warning, load, machine, write_section


def _rank(cfg: dict, rank: int, port_q) -> dict:
    import PIL.Image
    import PIL.ImageDraw
    import torch
    from diffusers import AutoencoderKLWan
    from diffusers.video_processor import VideoProcessor

    from clipmesh.plan import num_latent_frames, split_clips
    from clipmesh.worker.adapters.wan_encode import ConditionEncoder
    from clipmesh.worker.peak_memory import PeakMemory

    vae = AutoencoderKLWan.from_pretrained(cfg["folder"], subfolder="vae").eval()
    side, frames = cfg["size"], cfg["frames"]
    image = PIL.Image.new("RGB", (side, side), (20, 40, 200))
    PIL.ImageDraw.Draw(image).ellipse((side // 4, side // 4, side // 2, side // 2), fill=(220, 30, 30))
    pixels = VideoProcessor(vae_scale_factor=vae.config.scale_factor_spatial).preprocess(image, height=side, width=side)
    latent = num_latent_frames(frames, vae.config.scale_factor_temporal)
    start, end = split_clips(latent, cfg["workers"])[rank]
    memory = PeakMemory("cpu")
    with torch.no_grad():
        memory.reset()
        before, began = memory.peak(), time.perf_counter()
        if cfg["how"] == "whole":  # the pipeline's prepare_latents
            video = torch.cat([pixels.unsqueeze(2), pixels.new_zeros(1, 3, frames - 1, side, side)], dim=2)
            clip = vae.encode(video).latent_dist.mode()[:, :, start:end]
        else:
            encoder = ConditionEncoder(vae)
            clip = ConditionEncoder.clip(encoder.encode_head(pixels, latent), start, end)
        seconds, peak = time.perf_counter() - began, memory.peak()
    assert clip.shape[2] == end - start
    return dict(rank=rank, seconds=seconds, peak_mb=(peak - before) / 2**20, clip=end - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench-wan")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--frames", type=int, default=257)
    parser.add_argument("--output", default=str(DOCS / "bench-strategies.md"))
    args = parser.parse_args()
    stop_ranks_on_exit()
    from clipmesh.presets import model_folder

    folder, at_start, rows = str(model_folder(args.model)), load(), []
    for how, workers, label in (("whole", 1, "one `vae.encode` of the whole [image, zeros] (the pipeline)"),
                                ("head", 1, "the head, then the clip (clipmesh)"),
                                ("head", 2, "the head, then each rank's clip (clipmesh)")):
        out = run_ranks(_rank, dict(folder=folder, size=args.size, frames=args.frames, how=how), workers,
                        f"i2v-{how}-{workers}")
        if out.error:
            raise SystemExit(f"{how}, {workers} workers: {out.error}")
        rows.append(f"| {label} | {workers} | {' / '.join(str(r['clip']) for r in out.ranks)} | "
                    f"{max(r['seconds'] for r in out.ranks):.1f} | {max(r['peak_mb'] for r in out.ranks):.0f} |")
        print(rows[-1], flush=True)
    text = "\n".join([
        "## Image-to-video: the condition encode", "",
        f"`python -m bench.bench_i2v` on {machine()}, {datetime.date.today()}. {args.model}'s VAE (Wan 2.1's "
        f"causal VAE) at {args.size}x{args.size}, {args.frames} frames: the encoded [image, zeros...] that "
        "WanImageToVideoPipeline puts beside the latents. Seconds and peak (the peak RSS during the encode "
        "minus the RSS before it): the slowest rank; fresh spawned processes with 1 thread each. Both ways "
        "give the same latents (tests/test_wan_i2v.py).", busy_warning(at_start), "",
        "| encode | workers | latent frames per rank | seconds | peak MB per rank |",
        "|---|---:|---|---:|---:|", *rows])
    write_section(args.output, "i2v-encode", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
