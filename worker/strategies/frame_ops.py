"""Frame-spanning operators of UNet3D-style models made exact across clips: what every
frames-partition strategy (exact, clip_parallel, ulysses) does with UNet3D's temporal convs
and frame norms.

Each rank holds a clip [start, end) of the video's latent frames. Two kinds of UNet3D module
see beyond a frame besides attention:

- GroupNorm over [B, C, F, H, W] (TransformerTemporalModel.norm, the norms in
  TemporalConvLayer): its per-group mean and variance span all frames of the video.
  `sync_group_norm` computes each rank's statistics over its *valid* frames in float64,
  gathers them (count, mean, M2 per batch item and group: a few floats) and combines them
  (Chan et al.'s parallel variance, in float64): the video's mean and variance, nearly
  exact and without the cancellation a sum/sum-of-squares all-reduce suffers when
  |mean| >> std. From there it repeats torch's own group_norm kernel op for op: mean and
  variance rounded to the compute dtype, rstd = 1 / sqrt(var + eps) (eps in double, as the
  CPU kernel has it), per channel scale = rstd * gamma and bias = beta - scale * mean (one
  rounding: the kernel's compiled multiply-add is fused), y = x * scale + bias (fused too
  where the native kernel fuses it: probed once per device). So the output differs from
  the single-device norm only where torch's own float32 statistics are off by an ulp
  (about a third of the outputs, by one ulp). On a mesh of one rank holding every frame
  it calls torch's kernel itself.
- TemporalConvLayer: 4 stacked kernel-3 convs along time, so an output frame depends on
  input frames within +-4. `HaloTemporalConv` fetches up to HALO input frames each side from
  the neighbouring clips (Mesh.exchange_halos: further ranks too where a neighbour's clip is
  shorter than the halo), runs the layer on halo + clip + halo, and crops back. Halo outputs
  are wrong near their outer edge (the convs zero-pad there) but the error moves in one frame
  per conv, so after 4 convs it stops exactly at the clip. At the video's two ends there is no
  halo: the convs' own zero padding is then what the single device does. The layer's norms
  take their statistics over the clip's frames only (halo frames belong to a neighbour, which
  counts them), so the whole layer equals the single-device one.

Patches replace a module instance's `forward` (never the class), recorded in the job's
Patches (worker/patches.py), whose `remove` restores the instance exactly as found.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

HALO = 4  # frames each side a TemporalConvLayer needs: 4 stacked kernel-3 convs


def _multiply_add(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, fused: bool) -> torch.Tensor:
    """x * scale + bias, with one rounding if `fused` (FMA: the product is exact in float64 for
    float32 operands; float64 itself is rounded twice, a 1e-16 effect)."""
    if not fused or x.dtype == torch.float64:
        return x * scale + bias
    return (x.double() * scale.double() + bias.double()).to(x.dtype)


@functools.lru_cache(maxsize=None)
def native_fuses_scale_bias(device_type: str) -> bool:
    """Whether torch's float32 group_norm kernel on this device type applies y = x * scale + bias
    as a fused multiply-add (CPU builds with FMA contract it; a build without does not).
    Probed on a small GroupNorm whose native mean and rstd are reused, so only the last
    step can differ."""
    gen = torch.Generator().manual_seed(0)
    x, gamma, beta = (torch.randn(shape, generator=gen).to(device_type) for shape in ((1, 4, 64), (4,), (4,)))
    y, mean, rstd = torch.ops.aten.native_group_norm(x, gamma, beta, 1, 4, 64, 1, 1e-5)
    scale = (rstd.view(1, 1, 1) * gamma.view(1, 4, 1))
    bias = _multiply_add(-scale, mean.view(1, 1, 1), beta.view(1, 4, 1), True)
    return torch.equal(_multiply_add(x, scale, bias, True), y)


def sync_group_norm(x: torch.Tensor, norm: torch.nn.GroupNorm, mesh, valid: tuple[int, int] | None = None) -> torch.Tensor:
    """`norm(x)` with statistics over every rank's valid frames. x: [B, C, F, ...] with frames
    on dim 2; `valid`: this rank's frames [a, b) on dim 2 that count (None: all). Every rank
    of `mesh` must call it at the same point (one small all-gather)."""
    b, c = x.shape[:2]
    if mesh.world_size == 1 and (valid is None or valid == (0, x.shape[2])):
        return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)  # the video is here: torch's own
    g = norm.num_groups
    compute = torch.promote_types(x.dtype, torch.float32)  # half precision computes in fp32, as native does
    part = x if valid is None else x.narrow(2, valid[0], valid[1] - valid[0])
    grouped = part.reshape(b, g, -1).double()
    var, mean = torch.var_mean(grouped, dim=-1, correction=0)
    n = torch.full_like(mean, grouped.shape[-1])
    stats = torch.stack([n, mean, var * n], dim=-1)  # [B, G, 3]: count, mean, M2 (float64)
    every = mesh.all_gather_uneven(stats[None], [1] * mesh.world_size, dim=0)  # [N, B, G, 3]
    counts, means, m2 = every.unbind(-1)
    total = counts.sum(0)
    g_mean = (counts * means).sum(0) / total
    g_var = (m2.sum(0) + (counts * (means - g_mean) ** 2).sum(0)) / total

    # torch's kernel from here: statistics held in the compute dtype, rstd from them
    mean = g_mean.to(compute).view(b, g, 1, 1)
    rstd = (1.0 / torch.sqrt(g_var.to(compute).double().clamp_min(0) + norm.eps)).to(compute).view(b, g, 1, 1)
    xg = x.to(compute).reshape(b, g, c // g, -1)  # [B, G, C/G, F*...]
    if norm.affine:
        fused = compute != torch.float64 and native_fuses_scale_bias(x.device.type)
        scale = rstd * norm.weight.to(compute).view(1, g, -1, 1)
        bias = _multiply_add(-scale, mean, norm.bias.to(compute).view(1, g, -1, 1), fused)
        y = _multiply_add(xg, scale, bias, fused)
    else:
        y = (xg - mean) * rstd
    return y.reshape(x.shape).to(x.dtype)


class SyncGroupNorm:
    """Installed as one GroupNorm's `forward`: synchronised statistics (see sync_group_norm)."""

    def __init__(self, norm: torch.nn.GroupNorm, mesh):
        self.norm, self.mesh = norm, mesh
        self.valid: tuple[int, int] | None = None  # set by HaloTemporalConv around its layer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3:
            raise ValueError(f"synchronised GroupNorm needs frames on dim 2, got shape {tuple(x.shape)}")
        return sync_group_norm(x, self.norm, self.mesh, self.valid)


class HaloTemporalConv:
    """Installed as one TemporalConvLayer's `forward`: input halos from the neighbouring clips.

    `inner`: the forward in effect before (called on halo + clip + halo frames); `norms`: the
    SyncGroupNorm patches of the layer's own norms, told which frames are the clip's."""

    def __init__(self, layer, inner, mesh, lengths: list[int], norms: list[SyncGroupNorm], halo: int = HALO):
        self.layer, self.inner, self.mesh, self.lengths, self.norms, self.halo = layer, inner, mesh, lengths, norms, halo

    def __call__(self, hidden_states: torch.Tensor, num_frames: int = 1) -> torch.Tensor:
        if num_frames != self.lengths[self.mesh.rank]:
            raise ValueError(f"rank {self.mesh.rank}: {num_frames} frames, plan says {self.lengths[self.mesh.rank]}")
        frames = hidden_states.unflatten(0, (-1, num_frames))  # [B, F, C, H, W]: rows are b * F + f
        left, right = self.mesh.exchange_halos(frames, 1, self.halo, self.halo, sizes=self.lengths)
        n_left, n_right = left.shape[1], right.shape[1]
        if n_left or n_right:
            frames = torch.cat([left, frames, right], dim=1)
        padded = n_left + num_frames + n_right
        for patch in self.norms:
            patch.valid = (n_left, n_left + num_frames)
        try:
            out = self.inner(frames.flatten(0, 1), num_frames=padded)
        finally:
            for patch in self.norms:
                patch.valid = None
        if not (n_left or n_right):
            return out
        return out.unflatten(0, (-1, padded))[:, n_left:n_left + num_frames].flatten(0, 1)


class TemporalOps:
    """The frame-spanning patches of one job on one rank, recorded in `patches`."""

    def __init__(self, mesh, lengths: list[int], patches, halo: int = HALO):
        self.mesh, self.lengths, self.patches, self.halo = mesh, lengths, patches, halo
        self._norms: dict[int, SyncGroupNorm] = {}

    def sync_norm(self, norm: torch.nn.GroupNorm) -> SyncGroupNorm:
        """Synchronise one GroupNorm's statistics (idempotent per norm)."""
        if id(norm) not in self._norms:
            patch = SyncGroupNorm(norm, self.mesh)
            self.patches.replace_forward(norm, patch)
            self._norms[id(norm)] = patch
        return self._norms[id(norm)]

    def halo_conv(self, layer: torch.nn.Module) -> None:
        """Give one TemporalConvLayer input halos; its GroupNorms are synchronised over clip frames."""
        norms = [self.sync_norm(m) for m in layer.modules() if isinstance(m, torch.nn.GroupNorm)]
        self.patches.replace_forward(layer, HaloTemporalConv(layer, layer.forward, self.mesh, self.lengths, norms,
                                                             self.halo))
