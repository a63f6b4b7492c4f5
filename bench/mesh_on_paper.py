"""On paper: which mesh fits 8 GPUs for Wan2.1-14B and Wan 2.2 A14B at 1,025 frames of 480x832,
its per-rank memory, and a time estimated from counted FLOPs and bytes (issue 22). No GPU was
at hand: every figure is arithmetic over the stated assumptions, printed with them.

    python -m bench.mesh_on_paper            # prints the table and writes its section in docs/bench-strategies.md

Assumptions (each a line below, so a reader can change one and rerun):
- Wan2.1-14B's transformer: 40 blocks, dim 5120, FFN 13824, 40 heads, patch 1x2x2, 14.0 B
  parameters; Wan 2.2 A14B: two such experts. bf16 weights. The workers run `--denoiser-on host`:
  UMT5-XXL's encoder (5.7 B, 11.4 GB) is on the device only while it encodes the prompt, before
  the job's weights arrive, so a rank's peak is the larger of the two; the VAE (0.25 GB) stays.
- 1,025 frames -> 257 latent frames of 60x104 -> 1,560 tokens each: 400,920 tokens; 50 steps;
  guidance on (2 denoiser calls a step, or 1 per rank under cfg 2).
- Activations: a rank's tokens x dim x 2 bytes x 12 live tensors in a block, plus, under `exact`, the
  whole video's K and V of one layer (gathered), under `clip_parallel` (P = 10, G = 16) its window's
  and the globals', under sharding one block's gathered weights (0.35 GB).
- Time: FLOPs at 40% of the GPU's dense bf16 peak (RTX 4090 165 TF, H100 SXM 990 TF) plus bytes
  moved at the link's rate (4090: PCIe 4.0 x16, 25 GB/s; H100: NVLink, 300 GB/s), not overlapped.
"""

from __future__ import annotations

import argparse

from bench.common import DOCS
from bench.report import write_section

BLOCKS, DIM, FFN, PARAMS = 40, 5120, 13824, 14.0e9
TEXT_GB, VAE_GB = 11.4, 0.25
TOKENS_PER_FRAME, LATENT_FRAMES, STEPS = 1560, 257, 50
TOKENS = TOKENS_PER_FRAME * LATENT_FRAMES
WINDOW_FRAMES, GLOBAL_FRAMES = 21, 16
GPUS = {"8x RTX 4090 (24 GB)": (24, 165e12, 25e9), "8x H100 (80 GB)": (80, 990e12, 300e9)}
EFFICIENCY, BYTES = 0.4, 2
BLOCK_GB = PARAMS / BLOCKS * BYTES / 1e9


def estimate(experts: int, strategy: str, cfg: int, shard: bool, ranks: int = 8) -> tuple[float, float, float]:
    """(GB per rank, FLOPs per rank for the job, bytes a rank moves for the job)."""
    split = ranks // cfg
    calls = 2 // cfg  # denoiser calls a rank makes per step
    weights = experts * PARAMS * BYTES / 1e9
    if strategy == "block_pipeline":  # DualParal: every rank sees every frame's block, holds L/N layers
        held = weights / ranks
        tokens = TOKENS  # over the job, each block passes through every stage
        keys = (8 + 4) * TOKENS_PER_FRAME  # a block of 8 latent frames with 4 of context
        flops = STEPS * 2 * (2 * PARAMS / ranks * tokens + 4 * tokens * keys * DIM * BLOCKS / ranks)
        moved = STEPS * 2 * tokens * DIM * BYTES  # hidden states to the next stage
        act = 12 * 12 * TOKENS_PER_FRAME * DIM * BYTES / 1e9
        return VAE_GB + max(TEXT_GB, held + act), flops, moved
    held = weights / split if shard else weights
    tokens = TOKENS / split
    keys = TOKENS if strategy == "exact" else (WINDOW_FRAMES + GLOBAL_FRAMES) * TOKENS_PER_FRAME
    flops = STEPS * calls * (2 * PARAMS * tokens + 4 * tokens * keys * DIM * BLOCKS)
    kv = 2 * keys * DIM * BYTES if strategy == "exact" else 2 * (2 * 10 + GLOBAL_FRAMES) * TOKENS_PER_FRAME * DIM * BYTES
    act = (12 * tokens * DIM * BYTES + kv) / 1e9 + (BLOCK_GB if shard else 0)
    moved = STEPS * calls * BLOCKS * (kv if split > 1 else 0)
    moved += STEPS * calls * weights * 1e9 * (split - 1) / split if shard else 0  # each call gathers every block
    moved += STEPS * tokens * 16 * BYTES * (cfg - 1)  # the prediction between the branches
    return VAE_GB + max(TEXT_GB, held + act), flops, moved


MESHES = [("exact", 1, False), ("exact", 2, False), ("exact", 1, True), ("exact", 2, True),
          ("clip_parallel", 1, False), ("clip_parallel", 2, False), ("clip_parallel", 1, True),
          ("clip_parallel", 2, True), ("block_pipeline", 1, False)]
PEERS = ("xDiT: Ulysses/ring sequence parallel, whole weights per GPU (= `exact`, frames 8, unless --shard_dit);\n"
         "FastVideo: sequence parallel with FSDP-sharded weights (= `exact`, frames 8, sharded);\n"
         "DualParal: the block pipeline (= `block_pipeline`, 8 stages).")


def table() -> str:
    rows = []
    for model, experts in (("Wan2.1-14B", 1), ("Wan 2.2 A14B", 2)):
        for gpus, (memory, peak, link) in GPUS.items():
            for strategy, cfg, shard in MESHES:
                gb, flops, moved = estimate(experts, strategy, cfg, shard)
                seconds = flops / (peak * EFFICIENCY) + moved / link
                mesh = "8 stages" if strategy == "block_pipeline" else f"cfg {cfg} x frames {8 // cfg}"
                rows.append(f"| {model} | {gpus} | `{strategy}` | {mesh}{', sharded' if shard else ''} | {gb:.1f} | "
                            f"{'yes' if gb <= memory * 0.95 else 'no'} | {flops / 1e15:,.0f} | {moved / 1e9:,.0f} | "
                            f"{seconds / 60:,.0f} |")
    return "\n".join(["| model | GPUs | strategy | mesh | GB per rank | fits | PFLOP per rank | GB moved per rank "
                      "| minutes (est.) |", "|---|---|---|---|---:|---|---:|---:|---:|", *rows])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(DOCS / "bench-strategies.md"))
    args = parser.parse_args()
    assumptions = __doc__.split("Assumptions")[1].split("\n", 1)[1].strip()
    text = "\n".join(["## On paper: 14B models on 8 GPUs, 1,025 frames at 480x832", "",
                      "`python -m bench.mesh_on_paper`: arithmetic, not a measurement (no GPU was at hand). "
                      "Assumptions:", "", assumptions, "", table(), "",
                      "So on 24 GB cards `clip_parallel`, the strategy that keeps a long video coherent, fits "
                      "only with sharded weights (frames 8: 11.8 GB for Wan2.1-14B, 15.3 GB for A14B), at about "
                      "a fifth of `exact`'s time; cfg 2 x frames 4 halves the traffic but doubles a rank's shard. "
                      "On H100s every `clip_parallel` mesh fits; traffic decides, and the link is fast enough "
                      "that the FLOPs do.", "", "What the peers would run there:", "",
                      *[f"- {line}" for line in PEERS.splitlines()]])
    write_section(args.output, "mesh-on-paper", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
