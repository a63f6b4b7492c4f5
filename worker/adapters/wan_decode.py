"""Exact decode of any clip of a video with Wan's causal VAE, without the frames before it:
so every rank decodes its own clip, in parallel, bit for bit as one `vae.decode` of the whole.

Facts (diffusers' autoencoder_kl_wan.py, Wan 2.1): the decoder runs one latent frame at a time;
every causal conv keeps the last `_padding[4]` (2) frames of its *input* in a cache; the first
latent frame is special (1 video frame, a "Rep" marker instead of a time-conv cache). So the
state before latent frame s is a function of a finite run of frames before s. But the run is
long: each causal conv at a temporal rate of r frames per latent frame looks 2/r latent frames
back, and they add up to the receptive field R: tiny-wan's decoder R = 30 latent frames, Wan
2.1's layout R = 38 (tests/test_wan_decode.py measures it: a perturbation R+1 frames before a
clip leaves the clip unchanged, one R frames before changes it). Decoding R warm-up frames
through the whole decoder would cost each rank R extra frames (~60% extra at 129 latent
frames on 2 ranks).

Cheaper and still exact, the warm-up is cut per stage: the decoder is a chain of stages
(conv_in, mid block, up blocks, head), and stage b must process only the frames whose output a
later stage still needs, plus its own look-back: K_b = ceil(sum of the look-backs of stages
b..end) + 1 frames before s (the +1 absorbs the first processed frame, whose cache is a
fresh one). The early stages are cheap (latent resolution, one frame per latent frame) and
look back far; the expensive late ones (full resolution, 4 frames per latent frame) look back
a few frames. tiny-wan: K = 31, 29, 21, 11, 6, 4, 2 frames for its 7 stages; the warm-up
costs about what 3 extra frames through the whole decoder would.

Wan 2.2's VAE (TI2V-5B) is cut the same way: its residual up blocks add a shortcut
(DupUp3D) that duplicates frames as the temporal upsampler makes them, so a stage that starts
mid-video must make as many frames as one that has run since frame 0: its upsamplers' caches
start as "Rep" (the past as zeros), not empty (which makes one frame less). Its patches are
unpacked (unpatchify) after the head. Its R = 38 at Wan 2.2's layout, as Wan 2.1's.

A cache hand-off (each conv's tail passed from rank r-1 to r) would be exact too, but it is a
wavefront: rank r could start only once rank r-1 had decoded its whole clip, so the decode
would stay serial.
"""

from __future__ import annotations

import math

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import CACHE_T, WanCausalConv3d, unpatchify


def _conv(conv, x, feat_cache, feat_idx):
    """One cached causal conv, exactly as WanDecoder3d.forward runs conv_in and conv_out."""
    idx = feat_idx[0]
    cache_x = x[:, :, -CACHE_T:, :, :].clone()
    if cache_x.shape[2] < 2 and feat_cache[idx] is not None:
        cache_x = torch.cat([feat_cache[idx][:, :, -1, :, :].unsqueeze(2).to(cache_x.device), cache_x], dim=2)
    x = conv(x, feat_cache[idx])
    feat_cache[idx] = cache_x
    feat_idx[0] += 1
    return x


class ClipDecoder:
    """WanDecoder3d.forward cut into its stages, each with where its caches start, how far it
    looks back (latent frames) and how many frames before a clip it must process (`warmup`)."""

    def __init__(self, vae):
        d = vae.decoder
        self.vae = vae
        head = lambda x, c, i, first: _conv(d.conv_out, d.nonlinearity(d.norm_out(x)), c, i)  # noqa: E731
        self.stages = [lambda x, c, i, first: _conv(d.conv_in, x, c, i),
                       lambda x, c, i, first: d.mid_block(x, feat_cache=c, feat_idx=i),
                       *(self._up(block) for block in d.up_blocks), head]
        modules = [d.conv_in, d.mid_block, *d.up_blocks, d.conv_out]
        rate, lookback = 1, []
        for module in modules:
            frames = sum(m._padding[4] for m in module.modules() if isinstance(m, WanCausalConv3d))
            lookback.append(frames / rate)
            if any(getattr(m, "mode", "") == "upsample3d" for m in module.modules()):
                rate *= 2
        self.rate = rate  # video frames per latent frame at the output (after the first)
        self.warmup = [math.ceil(sum(lookback[b:])) + 1 for b in range(len(modules))]
        self.cache_start, self.upsample_slots = self._cache_starts()

    @staticmethod
    def _up(block):
        return lambda x, c, i, first: block(x, feat_cache=c, feat_idx=i, first_chunk=first)

    def _cache_starts(self) -> tuple[list[int], list[list[int]]]:
        """Each stage's first cache index, and its temporal upsamplers' cache slots: one fresh
        first chunk through the stages, counting (an upsampler marks its slot "Rep")."""
        cache = [None] * self.vae._cached_conv_counts["decoder"]
        index, starts, upsamplers = [0], [], []
        x = torch.zeros(1, self.vae.config.z_dim, 1, 1, 1, device=self.vae.device, dtype=self.vae.dtype)
        with torch.no_grad():
            x = self.vae.post_quant_conv(x)
            for stage in self.stages:
                starts.append(index[0])
                x = stage(x, cache, index, True)
                upsamplers.append([i for i in range(starts[-1], index[0]) if isinstance(cache[i], str)])
        return starts, upsamplers

    def stream(self, first: int, start: int) -> "ClipStream":
        """A decode of latent frames fed in order from `first` (>= needed_from(start)), whose frames
        of latent frames >= `start` come out."""
        return ClipStream(self, first, start)

    @property
    def receptive_field(self) -> int:
        """R: the farthest latent frame before s that changes the frames of s (the +1 of the
        warm-up is for the fresh cache of the first frame processed)."""
        return self.warmup[0] - 1

    def needed_from(self, start: int) -> int:
        """The first latent frame a clip starting at `start` needs (its warm-up)."""
        return max(0, start - self.warmup[0])


class ClipStream:
    """One decode in progress: its causal caches and the next latent frame it expects, so latents
    can come piece by piece (block_pipeline's blocks) at the cost of one warm-up."""

    def __init__(self, decoder: ClipDecoder, first: int, start: int):
        if first > decoder.needed_from(start):
            raise ValueError(f"a clip from latent frame {start} needs its warm-up from {decoder.needed_from(start)}, "
                             f"got latents from {first}")
        self.d, self.start, self.next = decoder, start, first
        self.cache = [None] * decoder.vae._cached_conv_counts["decoder"]
        self.fresh = [True] * len(decoder.stages)  # a stage's first frame here meets empty caches

    @torch.no_grad()
    def feed(self, z: torch.Tensor, on_frames, chunk: int = 8) -> None:
        """z: VAE latents [1, C, n, h, w] of the next n latent frames -> on_frames(latent_start,
        float video [1, 3, T, H, W] in [-1, 1]) for those >= start, every `chunk` latent frames
        (memory: one chunk of output)."""
        d, n, first = self.d, z.shape[2], self.next
        # per voxel, but torch picks another conv kernel below 3 frames (1e-6 off): pad, drop
        x = d.vae.post_quant_conv(torch.cat([z, z[:, :, -1:].expand(-1, -1, max(0, 3 - n), -1, -1)], dim=2))
        out, out_start = [], max(first, self.start)
        for tau in range(first, first + n):
            h = x[:, :, tau - first:tau - first + 1]
            for b, stage in enumerate(d.stages):
                if tau < self.start - d.warmup[b]:
                    break  # this frame's output of stage b reaches nothing at or after `start`
                if self.fresh[b] and tau > 0:
                    # a stage starting mid-video: its temporal upsamplers double this frame as they
                    # do every frame after the first (their past taken as zeros, "Rep"), so every
                    # stage after it sees the frame count of the whole decode (Wan 2.2's residual
                    # up blocks add a shortcut of exactly that count)
                    for slot in d.upsample_slots[b]:
                        self.cache[slot] = "Rep"
                h = stage(h, self.cache, [d.cache_start[b]], tau == 0)
                self.fresh[b] = False
            else:
                if tau >= self.start:
                    out.append(h)
            if len(out) == chunk or (out and tau == first + n - 1):
                video = torch.cat(out, dim=2)
                if d.vae.config.patch_size is not None:  # Wan 2.2's VAE decodes 2x2 patches as channels
                    video = unpatchify(video, d.vae.config.patch_size)
                on_frames(out_start, torch.clamp(video, min=-1.0, max=1.0))
                out_start, out = tau + 1, []
        self.next = first + n
