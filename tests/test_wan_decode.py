"""Exact distributed decode of Wan's causal VAE (worker/adapters/wan_decode.py): every rank
decodes its own clip from a warm-up of the latent frames before it, and the frames are those of
one `AutoencoderKLWan.decode` call on the whole video, bit for bit on this CPU (the same ops on
the same per-frame shapes; the one per-voxel conv whose kernel torch picks by size runs on
>= 3 frames, as in the whole decode).

Three VAEs: tiny-wan's preset, Wan 2.1's layout (dim_mult 1,2,4,4; 2 res blocks) made narrow,
and Wan 2.2's (TI2V-5B: residual up blocks, 2x2 patches) made narrow.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan

from clipmesh import presets
from clipmesh.v1 import clipmesh_pb2 as pb
from ranks import run_ranks

WAN21_LAYOUT = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                    temperal_downsample=[False, True, True], dropout=0.0)
# Wan 2.2's VAE (TI2V-5B: z_dim 48, residual blocks, 2x2 patches as channels, x16 in space), narrow
WAN22_LAYOUT = dict(base_dim=8, decoder_base_dim=8, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                    temperal_downsample=[False, True, True], dropout=0.0, is_residual=True, in_channels=12,
                    out_channels=12, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4)
LATENT, SIDE = 45, 2  # latent frames and latent side of the test video


def _video(frames: int = LATENT, seed: int = 0, channels: int = 16) -> torch.Tensor:
    return torch.randn(1, channels, frames, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


def _first_frame(latent: int) -> int:
    return 0 if latent == 0 else 4 * (latent - 1) + 1


def _vaes():
    torch.manual_seed(0)
    folder = presets.model_folder("tiny-wan")
    return {"tiny-wan": AutoencoderKLWan.from_pretrained(folder, subfolder="vae").eval(),
            "wan2.1-layout": AutoencoderKLWan(**WAN21_LAYOUT).eval(),
            "wan2.2-layout": AutoencoderKLWan(**WAN22_LAYOUT).eval()}


@pytest.fixture(scope="module")
def vaes():
    return _vaes()


@pytest.mark.parametrize("name,expected", [("tiny-wan", 30), ("wan2.1-layout", 38), ("wan2.2-layout", 38)])
def test_receptive_field_is_measured(vaes, name, expected):
    """A perturbation R+1 latent frames before a clip leaves the clip's frames unchanged; one R
    frames before changes them. R is what the decoder's look-backs add up to."""
    from clipmesh.worker.adapters.wan_decode import ClipDecoder

    vae = vaes[name]
    r = ClipDecoder(vae).receptive_field
    assert r == expected
    start, z = r + 4, _video(r + 8, channels=vae.config.z_dim)
    with torch.no_grad():
        whole = vae.decode(z).sample[:, :, _first_frame(start):]
        for back, changes in ((r + 1, False), (r, True)):
            poked = z.clone()
            poked[:, :, start - back] += 1.0
            assert (not torch.equal(vae.decode(poked).sample[:, :, _first_frame(start):], whole)) == changes, back


@pytest.mark.parametrize("name", ["tiny-wan", "wan2.1-layout", "wan2.2-layout"])
@pytest.mark.parametrize("start,end", [(0, 1), (0, 5), (1, 3), (7, 20), (20, 45), (44, 45)])
def test_any_clip_decodes_alone_as_in_the_whole(vaes, name, start, end):
    from clipmesh.worker.adapters.wan_decode import ClipDecoder

    vae = vaes[name]
    z = _video(channels=vae.config.z_dim)
    decoder = ClipDecoder(vae)
    first = decoder.needed_from(start)
    pieces = []
    with torch.no_grad():
        whole = vae.decode(z).sample
        decoder.stream(first, start).feed(z[:, :, first:end], lambda s, video: pieces.append((s, video)), chunk=3)
    assert [s for s, _ in pieces] == list(range(start, end, 3))  # chunks of 3 latent frames, in order
    got = torch.cat([video for _, video in pieces], dim=2)
    assert torch.equal(got, whole[:, :, _first_frame(start):_first_frame(end - 1) + (4 if end > 1 else 1)])


def test_a_stream_fed_piece_by_piece_is_the_whole_decode(vaes):
    """block_pipeline's decode: one warm-up, then blocks fed one after another to the same
    stream; the frames are the whole video's, whatever the pieces."""
    from clipmesh.worker.adapters.wan_decode import ClipDecoder

    vae, z = vaes["tiny-wan"], _video()
    decoder, start = ClipDecoder(vae), 33
    first, frames = decoder.needed_from(start), []
    stream = decoder.stream(first, start)
    with torch.no_grad():
        whole = vae.decode(z).sample
        for a, b in ((first, start + 2), (start + 2, start + 7), (start + 7, LATENT)):
            stream.feed(z[:, :, a:b], lambda s, video: frames.append(video), chunk=4)
    assert torch.equal(torch.cat(frames, dim=2), whole[:, :, _first_frame(start):])
    with pytest.raises(ValueError, match="warm-up"):
        decoder.stream(first + 1, start)


def _rank_decode(mesh, folder, lengths):
    """The runner's Decoder on this rank's clip of the test video (frames kept as float)."""
    from clipmesh.worker.adapters import load_adapter
    from clipmesh.worker.job import FinishedLatents, Job
    from clipmesh.worker.render import Decoder

    model = load_adapter(folder, "cpu", torch.float32)
    model.to_uint8 = lambda video: video.numpy()  # compare the VAE's float output, not its rounding
    starts = np.cumsum([0, *lengths]).tolist()
    plan = pb.RenderPlan(world_size=mesh.world_size, num_latent_frames=sum(lengths),
                         clips=[pb.ClipRange(start=s, end=e) for s, e in zip(starts, starts[1:])])
    start, end = starts[mesh.rank], starts[mesh.rank + 1]
    pieces = []
    with torch.no_grad():
        Decoder(Job(model, plan, mesh.rank, mesh), pieces.append).add(
            FinishedLatents(start, end, _video(sum(lengths))[:, :, start:end]))
    return [(p.first_frame, p.frames) for p in pieces]


@pytest.mark.parametrize("lengths", [[45], [1, 44], [20, 9, 16]], ids=["1-rank", "first-clip-1-frame", "clip-below-R"])
def test_ranks_decode_their_clips_as_the_whole_video(lengths):
    """1, 2, 3 ranks, uneven; a first clip of 1 latent frame; a clip (9) shorter than R (30),
    whose warm-up comes from two ranks back. No rank holds more than its clip and its warm-up."""
    from clipmesh.worker.adapters import load_adapter

    folder = str(presets.model_folder("tiny-wan"))
    model = load_adapter(folder, "cpu", torch.float32)
    with torch.no_grad():
        whole = model.pipe.vae.decode(model.unnormalize(_video(sum(lengths))), return_dict=False)[0].numpy()
    results = run_ranks(_rank_decode, len(lengths), folder, lengths, group=f"decode-{len(lengths)}")
    pieces = sorted(p for rank in sorted(results) for p in results[rank])
    assert {first for rank in results for first, _ in results[rank]} >= {_first_frame(s) for s in
                                                                      np.cumsum([0, *lengths[:-1]]).tolist()}
    assert all(results[rank] for rank in results)  # every rank decoded its own frames
    got = np.concatenate([frames for _, frames in pieces], axis=2)
    assert got.shape == whole.shape
    assert np.array_equal(got, whole)


def test_tiled_decode_is_an_approximation_of_the_exact_one():
    """savers.tiled_decode: diffusers' blended spatial tiles on a clip and its warm-up, the
    warm-up's frames dropped. With one tile per frame it is the exact decode (so the frames
    line up); with smaller tiles it differs (random weights blend poorly: approximate)."""
    from clipmesh.worker.adapters import load_adapter

    model = load_adapter(str(presets.model_folder("tiny-wan")), "cpu", torch.float32)
    model.to_uint8 = lambda video: video.numpy()
    z = torch.randn(1, 16, 12, 8, 8, generator=torch.Generator().manual_seed(3))  # 64x64 frames
    start, first = 5, model.clip_decoder.needed_from(5)

    def decode(tile: int | None) -> np.ndarray:
        frames = []
        if tile:
            model.pipe.vae.enable_tiling(tile_sample_min_height=tile, tile_sample_min_width=tile,
                                         tile_sample_stride_height=tile // 2, tile_sample_stride_width=tile // 2)
        try:
            with torch.no_grad():
                model.decode_stream(first, start, tiled=bool(tile)).feed(z[:, :, first:], lambda s, f: frames.append(f))
        finally:
            model.pipe.vae.disable_tiling()
        return np.concatenate(frames, axis=2)

    exact = decode(None)
    assert exact.shape == (1, 3, 4 * (12 - start), 64, 64)
    assert np.array_equal(decode(64), exact)
    tiled = decode(32)
    assert tiled.shape == exact.shape and not np.array_equal(tiled, exact)
