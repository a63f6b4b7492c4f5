"""Plan math both sides agree on: frames <-> latent frames, clip ranges, noise seeds.

Pure Python (no torch) so the coordinator can plan without loading a model.
"""

from __future__ import annotations

import hashlib


def num_latent_frames(num_frames: int, temporal_stride: int) -> int:
    """Latent frames a causal video VAE (Wan) needs for `num_frames` output frames."""
    if num_frames < 1 or (num_frames - 1) % temporal_stride:
        raise ValueError(f"num_frames must be {temporal_stride}*k+1, got {num_frames}")
    return (num_frames - 1) // temporal_stride + 1


def num_output_frames(latent_frames: int, temporal_stride: int) -> int:
    return (latent_frames - 1) * temporal_stride + 1


def split_clips(num_latent: int, world_size: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) latent ranges, one per rank; the first ranks take the remainder."""
    if not 1 <= world_size <= num_latent:
        raise ValueError(f"world_size must be in [1, {num_latent}] for {num_latent} latent frames, got {world_size}")
    base, extra = divmod(num_latent, world_size)
    clips, start = [], 0
    for rank in range(world_size):
        end = start + base + (1 if rank < extra else 0)
        clips.append((start, end))
        start = end
    return clips


def frame_seed(seed: int, frame_index: int) -> int:
    """Seed of one latent frame's initial noise: a pure function of (job seed, global frame index),
    so the video does not depend on the number of workers, the split, or a resume."""
    digest = hashlib.blake2b(f"clipmesh:{seed}:{frame_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF
