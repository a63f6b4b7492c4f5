"""Plan math both sides agree on: frames <-> latent frames, clip ranges, noise seeds.

Pure Python (no torch) so the coordinator can plan without loading a model.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator


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


def split_weighted(num_latent: int, speeds: list[float], min_len: int = 1) -> list[tuple[int, int]]:
    """Contiguous ranges of `num_latent` items (a frames partition's latent frames, or
    block_pipeline's transformer blocks) sized in proportion to each worker's speed (largest
    remainder), none shorter than `min_len` (the halo: a clip must cover what its neighbours ask of it).

    Equal speeds give exactly split_clips' even split, so the split is reproducible."""
    n = len(speeds)
    if n < 1 or any(s <= 0 for s in speeds):
        raise ValueError(f"speeds must be positive, got {speeds}")
    min_len = max(1, min(min_len, num_latent // n))
    if num_latent < n:
        raise ValueError(f"{num_latent} latent frames cannot give {n} workers a frame each")
    if len(set(speeds)) == 1:
        return split_clips(num_latent, n)
    shares = [num_latent * s / sum(speeds) for s in speeds]
    lengths = [int(share) for share in shares]
    # hand the frames lost to rounding down to the largest remainders (earlier rank on ties)
    for rank in sorted(range(n), key=lambda r: (-(shares[r] - lengths[r]), r))[: num_latent - sum(lengths)]:
        lengths[rank] += 1
    # lift clips below the floor with frames from the longest clips
    for rank in range(n):
        while lengths[rank] < min_len:
            donor = max(range(n), key=lambda r: (lengths[r], -r))
            lengths[donor] -= 1
            lengths[rank] += 1
    clips, start = [], 0
    for length in lengths:
        clips.append((start, start + length))
        start += length
    return clips


def global_frame_indices(num_latent: int, num_global: int) -> list[int]:
    """G latent-frame indices spread uniformly over the whole video (the centre of each of G
    equal segments): a pure function of (F, G), so it never depends on the number of
    workers or the split. G >= F gives every frame once; G = 0 gives none."""
    if num_global >= num_latent:
        return list(range(num_latent))
    return [int((2 * i + 1) * num_latent // (2 * num_global)) for i in range(num_global)]


def local_window(frame: int, halo: int, num_latent: int) -> tuple[int, int]:
    """[first, last] latent frames of `frame`'s local window under dual-scope attention: the
    2*halo+1 frames centred on it, shifted inward at the video's ends so that it never holds
    fewer frames than the video has (a clipped window at the ends attends over fewer frames than
    the model was trained on, and the frames there lose what the prompt asked)."""
    width = 2 * halo + 1
    first = min(max(frame - halo, 0), max(num_latent - width, 0))
    return first, min(first + width, num_latent) - 1


def block_ranges(num_latent: int, block_frames: int) -> Iterator[tuple[int, int]]:
    """Latent [start, end) of each block in order; endless when num_latent is 0 (unbounded)."""
    for start in itertools.count(0, block_frames):
        if num_latent and start >= num_latent:
            return
        yield start, min(start + block_frames, num_latent) if num_latent else start + block_frames


def latent_of_frame(frame: int, temporal_stride: int) -> int:
    """The latent frame an output frame decodes from (the first latent frame is one frame alone)."""
    return 0 if frame == 0 else (frame - 1) // temporal_stride + 1
