"""Train the `toy-wan` preset on CPU: a small AutoencoderKLWan, then a small
WanTransformer3DModel with flow matching, on the toy world's videos (clipmesh.toyworld: one
shape moving at the world's constant SPEED on a torus, wrapping round at the edges).

    python -m clipmesh.toytrain --out /tmp/toy-wan-train          # every phase from scratch, ~2 h on 2 cores
    python -m clipmesh.toytrain --out DIR --phase transformer      # one phase (each resumes from DIR)
    python -m clipmesh.toytrain --out DIR --vae-from OLD/vae --vae-stages 200x9x3x3e-4,100x17x2x2e-4 \
        --transformer-from OLD/transformer --transformer-steps 1500 --transformer-lr 5e-4
                                                                   # a fine-tune of earlier weights
                                                                   # (docs/toy-training.md: the one shipped)

From scratch (the default) the recipe is reproducible alone; --vae-from / --transformer-from
start the VAE's first stage run / the transformer from a trained folder instead (a fine-tune
for a changed world: the shipped weights were trained from scratch on the first, straight-line
world, then fine-tuned on the torus).

Phases, each writing into --out, so a phase can be rerun alone:
  vae          reconstruction, in stages of longer clips (VAE_STAGES): 5 frames (the causal VAE's
               first frame alone, then one 4-frame chunk: cheap, learns the world), then 9 and 17,
               where a chunk's causal cache comes from earlier chunks, as in every video. Trained
               on 5 frames alone, frames 6 and on decoded to mush; after 9, colours still drifted
               from frame 11 on. The loss weighs pixels that differ from the background 21x:
               with a plain loss the decoder learns the background and ignores its latent (every
               clip decodes to the same blur). No KL term (it collapsed the posterior): the
               posterior's mean is the latent. Each stage logs a held-out batch's loss.
  vae-check    the gate before the transformer trains: the detector must read the prompt
               (presence, colour, direction, the speed per window) back from reconstructions of
               17-frame clips, those whose shape crosses an edge of the torus included.
  latents      a fixed set of encoded 17-frame clips (--clip-frames: longer) and their prompts'
               text embeddings; the per-channel mean and std go into the VAE config (latents_mean /
               latents_std), as Wan's VAE carries them, so the transformer sees unit-scale latents
               (--keep-latent-stats: the VAE's own, for a transformer fine-tune).
  transformer  flow matching as Wan trains: x_t = (1 - s) x0 + s noise, target noise - x0,
               timestep 1000 s, s drawn through the scheduler's shift (3.0) so training sees the
               sigmas sampling visits; 10% of prompts dropped to "" so classifier-free guidance works.
               EMA weights are saved; a fixed batch's loss is logged before and after.
               On clips longer than 17 frames it trains on whole videos of a length drawn per step
               under clip_parallel's local window (each latent frame sees the native 5 around it,
               shifted inward at the ends): trained on 17-frame clips alone the model had never
               seen the middle of a video, and a window cut anywhere without the mask blurred the
               start (docs/quality.md). The shipped transformer's last fine-tune is this one:
                 --phase latents --clips 1536 --clip-frames 129 --keep-latent-stats, then
                 --phase transformer --transformer-from OLD/transformer --transformer-steps 1500
                 --transformer-lr 3e-4 (a VAE folder copied into --out first; docs/toy-training.md)
  export       the diffusers folder (WanPipeline.save_pretrained, safetensors) into --export
               (default shared/models/toy-wan).
  report       docs/toy-training.md and its loss curves (docs/toy-training.svg).

The text encoder (a 2-layer UMT5 with the presets' offline byte tokenizer) is random and frozen,
as Wan's UMT5 is frozen: the transformer learns to read it. Everything is seeded.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import time

import numpy as np
import torch

from clipmesh import presets, toyworld
from clipmesh.plan import local_window, num_latent_frames, num_output_frames

SIDE, FRAMES = 64, 17
PRESET = presets.PRESETS["toy-wan"]  # the architecture; this script gives it its weights
VAE_CONFIG, TRANSFORMER_CONFIG, TEXT_CONFIG = PRESET["vae"], PRESET["transformer"], PRESET["text_encoder"]
STRIDE = VAE_CONFIG["scale_factor_temporal"]
NATIVE_LATENT = num_latent_frames(FRAMES, STRIDE)  # the preset's native_latent_frames
NATIVE_SHARE = 0.3  # of the steps on long latents: videos of the native length (the start must stay)
DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
SHIFT = presets._WAN_SCHEDULER["flow_shift"]
NOTES = "<!-- notes: written by hand, kept when the report is rewritten -->"
TEXT_LENGTH = 32  # tokens: the longest toy prompt is 30 bytes and </s>
VAE_STAGES = "2000x5x4x1e-3,450x9x3x5e-4,250x17x2x3e-4"  # steps x frames x clips per step x learning rate


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def clips(rng: np.random.Generator, n: int, frames: int) -> tuple[list[toyworld.Scene], torch.Tensor]:
    """n scenes and their videos as the VAE takes them: [n, 3, frames, SIDE, SIDE] in [-1, 1]."""
    scenes = [toyworld.sample_scene(rng, SIDE, frames) for _ in range(n)]
    video = np.stack([toyworld.render(s, frames, SIDE) for s in scenes])
    return scenes, torch.from_numpy(video).float().permute(0, 4, 1, 2, 3) / 127.5 - 1


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[n, 3, F, H, W] in [-1, 1] -> uint8 [n, F, H, W, 3]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 4, 1).cpu().numpy()


def pick_device(name: str) -> torch.device:
    """--device: "auto" trains on the GPU where there is one (minutes there, CPU-hours here)."""
    if name != "auto":
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def warmup_cosine(opt, steps: int, warmup: int, floor: float):
    """A linear warm-up (at most a fifth of the run: short test runs), then a cosine from the
    learning rate down to `floor` times it."""
    warmup = min(warmup, max(steps // 5, 1))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * s / steps))))


def foreground_loss(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    background = torch.tensor(toyworld.BACKGROUND, dtype=x.dtype, device=x.device).view(1, 3, 1, 1, 1) / 127.5 - 1
    weight = 1 + 20 * ((x - background).abs().amax(1, keepdim=True) > 0.05).float()
    err = out - x
    return (weight * (err.abs() + err ** 2)).mean() / weight.mean()


def train_vae(out: pathlib.Path, steps: int, seed: int, batch: int = 4, frames: int = 5, lr: float = 1e-3,
              resume: bool = False, init: pathlib.Path | None = None, device=torch.device("cpu")) -> None:
    """One stage of VAE training on `frames`-frame clips; `resume`: from the last stage's weights
    (its curve and stages kept in vae_loss.json); else from `init`'s weights (a VAE folder: a
    fine-tune, its curve begun afresh) or from scratch."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 10 * resume)
    vae = (AutoencoderKLWan.from_pretrained(out / "vae") if resume else
           AutoencoderKLWan.from_pretrained(init) if init else AutoencoderKLWan(**VAE_CONFIG)).to(device)
    vae.train()
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    sched = warmup_cosine(opt, steps, warmup=20 if resume or init else 50, floor=0.1)
    past = json.loads((out / "vae_loss.json").read_text()) if resume else dict(loss=[], seconds=0.0, stages=[])
    _, held_out = clips(np.random.default_rng(seed + 99), 4, frames)  # the same clips before and after
    held_out = held_out.to(device)

    def held_out_loss() -> float:
        with torch.no_grad():
            return foreground_loss(vae.decode(vae.encode(held_out).latent_dist.mode()).sample, held_out).item()

    before, curve, t0 = held_out_loss(), [], time.time()
    for step in range(steps):
        _, x = clips(rng, batch, frames)
        x = x.to(device)
        loss = foreground_loss(vae.decode(vae.encode(x).latent_dist.mode()).sample, x)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        curve.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} ({frames} frames) loss {np.mean(curve[-50:]):.4f} ({time.time() - t0:.0f} s)")
    seconds = time.time() - t0
    vae.eval()
    after = held_out_loss()
    vae.cpu().save_pretrained(out / "vae")
    past["stages"].append(dict(steps=steps, frames=frames, batch=batch, lr=lr, seconds=seconds,
                               held_out=[before, after], **({"from": str(init)} if init else {})))
    log(f"vae stage: held-out loss {past['stages'][-1]['held_out'][0]:.4f} -> {past['stages'][-1]['held_out'][1]:.4f}")
    (out / "vae_loss.json").write_text(json.dumps(dict(loss=past["loss"] + curve, seconds=past["seconds"] + seconds,
                                                       stages=past["stages"])))


def check_vae(out: pathlib.Path, seed: int, n: int = 24, device=torch.device("cpu")) -> dict:
    """The detector's reading of reconstructed 17-frame clips; raises if it cannot read the prompt."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(out / "vae").eval().to(device)
    scenes, x = clips(np.random.default_rng(seed + 1), n, FRAMES)
    x = x.to(device)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        decoded = vae.decode(z).sample
        rec = to_uint8(decoded)
        moved = (vae.decode(z + torch.randn_like(z)).sample - decoded).abs().mean().item()
    tracks = [toyworld.track(r) for r in rec]
    scores = [dict(toyworld.prompt_accuracy(t, s), speed_error=toyworld.window_motion(t, FRAMES, s)["speed_error"])
              for t, s in zip(tracks, scenes)]
    result = {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}
    result["latent_sensitivity"] = moved
    # the clips whose shape crosses an edge of the torus (shown in parts) in some frame
    wrapped = [s for s, scene in zip(scores, scenes) if _crosses_an_edge(scene)]
    result["wrapped_clips"] = len(wrapped)
    result["wrapped_direction"] = float(np.mean([s["direction"] for s in wrapped])) if wrapped else math.nan
    log(f"vae check: {result}")
    (out / "vae_check.json").write_text(json.dumps(result))
    if (result["present"] < 0.95 or result["colour"] < 0.9 or result["direction"] < 0.9
            or result["speed_error"] > 0.2 or not result["wrapped_direction"] >= 0.9):
        raise SystemExit(f"the VAE does not reconstruct the world well enough to train on: {result}")
    return result


def _crosses_an_edge(scene: toyworld.Scene) -> bool:
    for f in range(FRAMES):
        for c in scene.centre(f):
            if min(c % SIDE, SIDE - c % SIDE) < scene.size:
                return True
    return False


def text_encoder_and_tokenizer(seed: int):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tokenizer = presets._tokenizer()
    tokenizer.model_max_length = TEXT_LENGTH  # saved with the model: the worker pads to it (wan.text_length)
    return UMT5EncoderModel(UMT5Config(**TEXT_CONFIG)).eval(), tokenizer


def embed(prompts: list[str], text_encoder, tokenizer) -> torch.Tensor:
    """The prompts' embeddings as the worker gets them: WanPipeline.encode_prompt at the worker's
    text length (the tokenizer's TEXT_LENGTH), zeros after each prompt's tokens. The transformer
    must train on that length: the pads' keys take part in its cross-attention."""
    from diffusers import WanPipeline

    from clipmesh.worker.adapters.wan import text_length

    text_only = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=None, scheduler=None, transformer=None)
    with torch.no_grad():
        return text_only.encode_prompt(prompts, do_classifier_free_guidance=False,
                                       max_sequence_length=text_length(tokenizer), device="cpu")[0]


def make_latents(out: pathlib.Path, n: int, seed: int, device=torch.device("cpu"), frames: int = FRAMES,
                 keep_stats: bool = False) -> None:
    """n encoded clips of `frames` frames. Clips longer than the native 17 are whole videos the
    transformer trains on under clip_parallel's window (train_transformer); the causal VAE's
    latents of a clip's first frames are those of the shorter clip, so their prefixes are videos
    of every length up to theirs. `keep_stats`: normalise by the VAE's latents_mean / latents_std
    as they are (a transformer fine-tune: the statistics it was trained with) instead of measuring them."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(out / "vae").eval().to(device)
    text_encoder, tokenizer = text_encoder_and_tokenizer(seed)
    rng = np.random.default_rng(seed + 2)
    latents, prompts, t0 = [], [], time.time()
    with torch.no_grad():
        for start in range(0, n, 16):
            scenes, x = clips(rng, min(16, n - start), frames)
            latents.append(vae.encode(x.to(device)).latent_dist.mode().cpu())
            prompts += [s.prompt for s in scenes]
            if start % 256 == 0:
                log(f"latents {start}/{n} ({time.time() - t0:.0f} s)")
    latents = torch.cat(latents)
    if keep_stats:
        mean, std = (torch.tensor(vae.config[k]) for k in ("latents_mean", "latents_std"))
    else:
        mean, std = latents.mean(dim=(0, 2, 3, 4)), latents.std(dim=(0, 2, 3, 4))
        vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
        vae.cpu().save_pretrained(out / "vae")
    vocabulary = sorted(set(prompts)) + [""]
    torch.save(dict(latents=(latents - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1),
                    prompt_index=torch.tensor([vocabulary.index(p) for p in prompts]),
                    vocabulary=vocabulary, embeddings=embed(vocabulary, text_encoder, tokenizer)),
               out / "latents.pt")
    log(f"{n} latents {tuple(latents.shape[1:])}, {len(vocabulary) - 1} prompts, mean |{mean.abs().mean():.3f}| "
        f"std {std.mean():.3f} ({time.time() - t0:.0f} s)")


class WindowedSelfAttention:
    """Wan's attention with its self-attention masked to `mask` (cross-attention untouched): one
    instance shared by every block, its mask set per step."""

    def __init__(self):
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        self.wan, self.mask = WanAttnProcessor(), None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is None:
            attention_mask = self.mask
        return self.wan(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)


def window_mask(frames: int, tokens: int, device=None) -> torch.Tensor | None:
    """clip_parallel's local phase as an attention mask over a video's tokens (frame-major, `tokens`
    per latent frame): each frame sees its plan.local_window of the native latent frames (never
    clipped: shifted inward at the ends, so a frame's place in its window tells a video's ends from
    its middle). None within the native length: there the window is the whole video."""
    if frames <= NATIVE_LATENT:
        return None
    sees = torch.zeros(frames, frames, dtype=torch.bool, device=device)
    for f in range(frames):
        first, last = local_window(f, NATIVE_LATENT // 2, frames)
        sees[f, first:last + 1] = True
    return sees.repeat_interleave(tokens, 0).repeat_interleave(tokens, 1)


def train_transformer(out: pathlib.Path, steps: int, batch: int, seed: int, lr: float = 1e-3,
                      init: pathlib.Path | None = None, device=torch.device("cpu")) -> None:
    """Flow matching from scratch, or from `init`'s weights (a transformer folder: a fine-tune).
    On latents of clips longer than the native 17 frames (make_latents' `frames`) each step takes a
    prefix of them, a whole video of a length drawn per step (the native one in NATIVE_SHARE of the
    steps, else any up to the clips'), `batch` * native / length videos, under clip_parallel's
    window: the model learns the middle of long videos as clip_parallel shows it them."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    data = torch.load(out / "latents.pt")
    latents, index, embeddings = (data[k].to(device) for k in ("latents", "prompt_index", "embeddings"))
    empty = len(data["vocabulary"]) - 1
    model = (WanTransformer3DModel.from_pretrained(init) if init else WanTransformer3DModel(**TRANSFORMER_CONFIG)).to(device)
    model.train()
    longest = latents.shape[2]
    windowed = WindowedSelfAttention() if longest > NATIVE_LATENT else None
    if windowed:
        model.set_attn_processor(windowed)
    tokens = (latents.shape[3] // TRANSFORMER_CONFIG["patch_size"][1]) * (latents.shape[4] // TRANSFORMER_CONFIG["patch_size"][2])
    lengths = np.random.default_rng(seed + 3)
    log(f"transformer {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
        f"{latents.shape[0]} clips" + (f", from {init}" if init else ""))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = warmup_cosine(opt, steps, warmup=100, floor=0.05)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # a fixed batch (clips, prompts, noise, sigmas over the whole range), before and after
    g = torch.Generator().manual_seed(seed + 99)
    fixed = torch.arange(min(16, len(latents)), device=device)
    fixed_sigma = torch.linspace(0.05, 0.95, len(fixed), device=device)
    fixed_noise = torch.randn(latents[fixed].shape, generator=g).to(device)

    def fixed_loss() -> float:  # on long latents: whole videos, under the window
        s = fixed_sigma.view(-1, 1, 1, 1, 1)
        if windowed:
            windowed.mask = window_mask(longest, tokens, device)
        with torch.no_grad():
            pred = model(hidden_states=(1 - s) * latents[fixed] + s * fixed_noise, timestep=fixed_sigma * 1000,
                         encoder_hidden_states=embeddings[index[fixed]], return_dict=False)[0]
        return torch.nn.functional.mse_loss(pred, fixed_noise - latents[fixed]).item()

    before, curve, t0 = fixed_loss(), [], time.time()
    for step in range(steps):
        length, videos = longest, batch
        if windowed:
            length = NATIVE_LATENT if lengths.random() < NATIVE_SHARE else int(lengths.integers(NATIVE_LATENT + 1, longest + 1))
            videos = max(2, round(batch * NATIVE_LATENT / length))
            windowed.mask = window_mask(length, tokens, device)
        pick = torch.randint(len(latents), (videos,)).to(device)
        x0 = latents[pick, :, :length]
        cond = torch.where(torch.rand(videos).to(device) < 0.1, torch.full((videos,), empty, device=device), index[pick])
        u = torch.rand(videos).to(device)
        sigma = SHIFT * u / (1 + (SHIFT - 1) * u)  # the scheduler's shifted sigmas
        noise = torch.randn_like(x0)
        s = sigma.view(-1, 1, 1, 1, 1)
        pred = model(hidden_states=(1 - s) * x0 + s * noise, timestep=sigma * 1000,
                     encoder_hidden_states=embeddings[cond], return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred, noise - x0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            for k, v in model.state_dict().items():
                ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
        curve.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            log(f"transformer step {step}/{steps} loss {np.mean(curve[-50:]):.4f} ({time.time() - t0:.0f} s)")
    seconds = time.time() - t0
    model.load_state_dict(ema)
    fixed_after = fixed_loss()
    log(f"transformer: loss on a fixed batch {before:.4f} -> {fixed_after:.4f} (EMA weights)")
    model.eval().cpu().save_pretrained(out / "transformer")
    (out / "transformer_loss.json").write_text(json.dumps(dict(loss=curve, seconds=seconds, batch=batch, lr=lr,
                                                               fixed_batch=[before, fixed_after], latent_frames=longest,
                                                               **({"from": str(init)} if init else {}))))


def export(out: pathlib.Path, target: pathlib.Path, seed: int) -> None:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    text_encoder, tokenizer = text_encoder_and_tokenizer(seed)
    vae = AutoencoderKLWan.from_pretrained(out / "vae").eval()
    # what WanPipeline reads its scale factors from (the network's own layout has them too)
    vae.register_to_config(**{k: VAE_CONFIG[k] for k in ("scale_factor_spatial", "scale_factor_temporal")})
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder,
                       vae=vae,
                       scheduler=UniPCMultistepScheduler(**presets._WAN_SCHEDULER),
                       transformer=WanTransformer3DModel.from_pretrained(out / "transformer").eval())
    pipe.save_pretrained(target, safe_serialization=True)
    # the trained length, which the configs cannot say: a folder judged by path is judged as toy-wan
    (pathlib.Path(target) / presets.DECLARED_LIMITS).write_text(json.dumps(
        {k: PRESET["limits"][k] for k in presets.DECLARABLE}, indent=2) + "\n")
    log(f"exported to {target}")


def report(out: pathlib.Path) -> None:
    """docs/toy-training.md and its loss curves (an SVG: no plotting package needed)."""
    vae, transformer = (json.loads((out / f"{part}_loss.json").read_text()) for part in ("vae", "transformer"))
    check = json.loads((out / "vae_check.json").read_text())
    curves = [("VAE (foreground-weighted L1 + L2)", vae["loss"]), ("transformer (flow matching MSE)", transformer["loss"])]
    DOCS.joinpath("toy-training.svg").write_text(_svg(curves))
    rows, done = [], 0
    for i, st in enumerate(vae["stages"]):
        part = vae["loss"][done:done + st["steps"]]
        done += st["steps"]
        start = f", from {st['from']}" if "from" in st else ""
        rows.append(f"| VAE stage {i + 1} (lr {st['lr']:g}{start}) | {st['steps']} | {st['batch']} clips x {st['frames']} frames "
                    f"| {st['seconds']:.0f} | {np.mean(part[:50]):.4f} | {np.mean(part[-50:]):.4f} |")
    stages = "\n".join(rows)
    doc = DOCS / "toy-training.md"
    notes = doc.read_text().partition(NOTES)[2] if doc.is_file() else ""  # written by hand: kept
    doc.write_text(f"""# Training the toy-wan preset

`python -m clipmesh.toytrain --out DIR` (seeded; see the module's docstring for what each phase
does and why). Trained once on 2 CPU cores and committed in `shared/models/toy-wan`; CI never trains.

| phase | steps | batch | seconds | loss, first 50 steps | loss, last 50 steps |
|---|---|---|---|---|---|
{stages}
| transformer (lr {transformer.get("lr", 1e-3):g}{", from " + transformer["from"] if "from" in transformer else ""}) | {len(transformer["loss"])} | {_transformer_batch(transformer)} | {transformer["seconds"]:.0f} | {np.mean(transformer["loss"][:50]):.4f} | {np.mean(transformer["loss"][-50:]):.4f} |

The VAE's gate before the transformer trained (the detector on reconstructions of 24 held-out
17-frame clips; speed error: |measured - SPEED| / SPEED; the clips whose shape crosses an edge
of the torus and their direction; latent sensitivity: mean output change under unit noise on the
latent):

| present | colour | shape | direction | speed error | clips across an edge: direction | latent sensitivity |
|---|---|---|---|---|---|---|
| {check["present"]:.2f} | {check["colour"]:.2f} | {check["shape"]:.2f} | {check["direction"]:.2f} | {check.get("speed_error", math.nan):.3f} | {check.get("wrapped_clips", 0)}: {check.get("wrapped_direction", math.nan):.2f} | {check["latent_sensitivity"]:.3f} |

![loss curves](toy-training.svg)

{NOTES}{notes or chr(10)}""")


def _transformer_batch(transformer: dict) -> str:
    longest = transformer.get("latent_frames", NATIVE_LATENT)
    if longest <= NATIVE_LATENT:
        return f"{transformer['batch']} clips x {FRAMES} frames"
    return (f"{transformer['batch']} x {FRAMES} frames' latents: videos of {FRAMES} to {num_output_frames(longest, STRIDE)} frames "
            f"under clip_parallel's window")


def _svg(curves: list[tuple[str, list[float]]], width: int = 480, height: int = 200) -> str:
    """One panel per curve: the loss (a 25-step running mean) against the step, log scale."""
    panels = []
    for i, (title, loss) in enumerate(curves):
        smooth = np.convolve(loss, np.ones(25) / 25, mode="valid") if len(loss) > 25 else np.asarray(loss)
        logs = np.log10(np.maximum(smooth, 1e-8))
        low, high = logs.min(), max(logs.max(), logs.min() + 1e-6)
        xs = 40 + (width - 50) * np.arange(len(logs)) / max(len(logs) - 1, 1)
        ys = 20 + (height - 45) * (high - logs) / (high - low)
        points = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys))
        panels.append(f'<g transform="translate({i * width},0)"><text x="40" y="14" font-size="12">{title}</text>'
                      f'<polyline fill="none" stroke="#36c" stroke-width="1.5" points="{points}"/>'
                      f'<text x="2" y="24" font-size="10">{10 ** high:.3g}</text>'
                      f'<text x="2" y="{height - 25}" font-size="10">{10 ** low:.3g}</text>'
                      f'<text x="40" y="{height - 8}" font-size="10">step 0</text>'
                      f'<text x="{width - 60}" y="{height - 8}" font-size="10">{len(loss)}</text></g>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width * len(curves)}" height="{height}" '
            f'font-family="sans-serif">{"".join(panels)}</svg>\n')


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=pathlib.Path, required=True, help="working folder (each phase's results)")
    ap.add_argument("--phase", default="all", choices=["all", "vae", "vae-check", "latents", "transformer", "export", "report"])
    ap.add_argument("--vae-stages", default=VAE_STAGES,
                    help="STEPSxFRAMESxBATCHxLR,...: the VAE's stages, each from the last one's weights")
    ap.add_argument("--vae-from-stage", type=int, default=1, help="start at this stage (1-based) from the VAE in --out")
    ap.add_argument("--clips", type=int, default=3072, help="encoded clips the transformer trains on")
    ap.add_argument("--clip-frames", type=int, default=FRAMES,
                    help="frames per encoded clip; longer than 17: whole videos trained under clip_parallel's window")
    ap.add_argument("--keep-latent-stats", action="store_true",
                    help="normalise latents by the VAE's own latents_mean/std (a transformer fine-tune) instead of measuring them")
    ap.add_argument("--transformer-steps", type=int, default=3200)
    ap.add_argument("--transformer-lr", type=float, default=1e-3)
    ap.add_argument("--vae-from", type=pathlib.Path, default=None,
                    help="a VAE folder the first stage run fine-tunes (default: from scratch)")
    ap.add_argument("--transformer-from", type=pathlib.Path, default=None,
                    help="a transformer folder to fine-tune (default: from scratch)")
    ap.add_argument("--batch", type=int, default=64, help="clips of 17 frames per transformer step")
    ap.add_argument("--seed", type=int, default=20261201)
    ap.add_argument("--export", type=pathlib.Path, default=presets.TRAINED_ROOT / "toy-wan")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="auto", help="auto (CUDA where there is one, else the CPU), cpu, cuda, cuda:1")
    args = ap.parse_args(argv)
    if args.clip_frames < FRAMES or (args.clip_frames - 1) % STRIDE:
        ap.error(f"--clip-frames must be {STRIDE}k+1 and at least {FRAMES} (the VAE's frames), got {args.clip_frames}")
    device = pick_device(args.device)
    log(f"training on {device}")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    run = (lambda phase: args.phase in ("all", phase))
    if run("vae"):
        for number, stage in enumerate(args.vae_stages.split(","), 1):
            steps, frames, batch, lr = stage.split("x")
            if number >= args.vae_from_stage:
                first = number == args.vae_from_stage and args.vae_from is not None  # a fine-tune's first stage
                train_vae(args.out, int(steps), args.seed, int(batch), int(frames), float(lr),
                          resume=number > 1 and not first, init=args.vae_from if first else None, device=device)
    if run("vae-check"):
        check_vae(args.out, args.seed, device=device)
    if run("latents"):
        make_latents(args.out, args.clips, args.seed, device, args.clip_frames, args.keep_latent_stats)
    if run("transformer"):
        train_transformer(args.out, args.transformer_steps, args.batch, args.seed, args.transformer_lr,
                          args.transformer_from, device)
    if run("export"):
        export(args.out, args.export, args.seed)
    if run("report"):
        report(args.out)


if __name__ == "__main__":
    main()
