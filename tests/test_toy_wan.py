"""The trained toy-wan preset: it loads offline from the package, its videos show the prompt's
colour and motion, at the toy world's speed (read back by the toy world's detector), and the
random-weight tiny-wan's do not; its training, run short and seeded, learns."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import imageio.v3 as iio
import numpy as np

from clipmesh import toyworld


def shows(video: np.ndarray, prompt: str) -> dict:
    """What the detector reads of the prompt in `video` (uint8 [F, H, W, 3]): the share of frames
    with a shape of the prompt's colour, whether the track moves the prompt's way, and how far
    its speed is from the world's (per 17-frame window: here the one window)."""
    detections = toyworld.track(video)
    scene = toyworld.scene_of(prompt)
    return dict(toyworld.prompt_accuracy(detections, scene), moved=toyworld.direction_of(detections),
                speed_error=toyworld.window_motion(detections, 17, scene)["speed_error"])


PROMPTS = [("a red circle moving right", 0), ("a green square moving down", 1), ("a blue triangle moving left", 2),
           ("a yellow circle moving up", 3), ("a red square moving left", 4), ("a green triangle moving right", 5),
           ("a blue circle moving down", 6), ("a yellow square moving up", 7)]


def mean_reading(model: str) -> dict:
    """The detector's reading averaged over PROMPTS (one sample each: a model is judged on many
    samples, not one seed)."""
    seen = [shows(pipeline_video(model, prompt, seed), prompt) for prompt, seed in PROMPTS]
    return {k: float(np.mean([s[k] for s in seen])) for k in ("present", "colour", "shape", "direction", "speed_error")}


def offline_env(tmp_path) -> dict:
    # a fresh cache (nothing built before) and no hub: the preset must come from the package
    return {**os.environ, "CLIPMESH_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}


def test_the_demo_shows_the_prompt(tmp_path):
    """`make demo`'s own commands (read from the Makefile): the trained preset through a real
    coordinator and 2 workers, then the detector's reading of the video."""
    root = Path(__file__).resolve().parent.parent
    listed = subprocess.run(["make", "-s", "-n", "demo"], cwd=root, capture_output=True, text=True, check=True).stdout
    commands = [shlex.split(line) for line in listed.splitlines() if "clipmesh" in line and "pip" not in line]
    assert [c[1:3] for c in commands] == [["generate", "a red circle moving right"],
                                          ["-m", "clipmesh.toyworld"]], listed
    out = tmp_path / "demo.mp4"
    outputs = []
    for command in commands:
        command = [str(out) if arg == "out/demo.mp4" else arg for arg in command]
        proc = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=240, env=offline_env(tmp_path))
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs.append(proc.stdout)
    prompt = commands[0][2]
    assert f'"{prompt}"' in outputs[0]  # the demo says what it was asked for
    assert outputs[1].startswith("17 frames; a shape in ") and "it moves right (asked: right)" in outputs[1], outputs[1]
    assert iio.imread(out).shape == (17, 64, 64, 3)
    assert not (tmp_path / "cache").exists()  # loaded from the package, nothing built


def pipeline_video(model: str, prompt: str, seed: int) -> np.ndarray:
    """diffusers' own WanPipeline on the preset's folder, in this process."""
    import torch
    from diffusers import WanPipeline

    from clipmesh.presets import model_folder
    from clipmesh.worker.adapters.wan import text_length

    pipe = WanPipeline.from_pretrained(model_folder(model), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(prompt, height=64, width=64, num_frames=17, num_inference_steps=8, guidance_scale=5.0,
                  generator=torch.Generator().manual_seed(seed), output_type="np",
                  max_sequence_length=text_length(pipe.tokenizer)).frames[0]  # the text length it trained at
    return np.round(frames * 255).astype(np.uint8)


def test_the_trained_model_shows_the_prompts_colour_and_motion_and_random_weights_do_not(tmp_path, monkeypatch):
    """Over 8 prompts: the shape is there and of the prompt's colour in most frames, its track
    moves the prompt's way in most videos, at about the world's speed (the weights before the
    torus world read 0.52 off it, these 0.28; the shape's kind is not asserted: it is learned
    only half way, docs/toy-training.md)."""
    monkeypatch.setenv("CLIPMESH_CACHE", str(tmp_path / "cache"))  # tiny-wan built afresh, not a cached copy
    trained, random = mean_reading("toy-wan"), mean_reading("tiny-wan")
    assert trained["present"] >= 0.8 and trained["colour"] >= 0.8 and trained["direction"] >= 0.85, trained
    assert trained["speed_error"] <= 0.4, trained
    # the same checks fail for random weights
    assert random["colour"] < 0.4 and random["direction"] < 0.5 and random["speed_error"] > 0.4, random


def test_a_short_seeded_training_run_learns(tmp_path):
    """Each phase, short and in this process (the full run is 1.5 h and not part of CI): the VAE's
    held-out loss and the transformer's loss on a fixed batch fall, the same seed gives the same
    curve, and the export is a folder WanPipeline loads."""
    from clipmesh import toytrain

    def train(out, *args):
        toytrain.main(["--out", str(out), *args])

    def record(out, part):
        return json.loads((out / f"{part}_loss.json").read_text())

    run = tmp_path / "run"
    train(run, "--phase", "vae", "--vae-stages", "30x5x2x1e-3")  # the torus: 20 fell by 0.83x
    vae = record(run, "vae")
    before, after = vae["stages"][0]["held_out"]  # the same held-out clips before and after
    assert after < 0.8 * before, vae["stages"]
    train(run, "--phase", "latents", "--clips", "16")
    train(run, "--phase", "transformer", "--transformer-steps", "20", "--batch", "4")
    before, after = record(run, "transformer")["fixed_batch"]  # the same clips, noise and sigmas
    assert after < 0.8 * before, (before, after)
    for again in ("again", "once more"):  # seeded: the same run gives the same losses
        train(tmp_path / again, "--phase", "vae", "--vae-stages", "3x5x2x1e-3")
    assert record(tmp_path / "again", "vae")["loss"] == record(tmp_path / "once more", "vae")["loss"]

    train(run, "--phase", "export", "--export", str(tmp_path / "folder"))
    from diffusers import WanPipeline
    pipe = WanPipeline.from_pretrained(tmp_path / "folder")
    assert pipe.vae_scale_factor_spatial == 4 and pipe.transformer.config.num_layers == 6
    from clipmesh.presets import model_limits
    assert model_limits(str(tmp_path / "folder"))["native_latent_frames"] == 5  # judged as toy-wan, not Wan


def test_the_long_video_fine_tune_trains_under_clip_parallels_window(tmp_path):
    """--clip-frames longer than 17: the transformer trains on whole videos under clip_parallel's
    local window. The mask reaches the real model (a latent frame's output does not move when a
    frame beyond its layers' reach of windows changes, and does without the mask; within the native
    length there is no mask), and a short run on 33-frame clips learns."""
    import shutil

    import torch
    from diffusers import WanTransformer3DModel

    from clipmesh import presets, toytrain

    model = WanTransformer3DModel.from_pretrained(presets.TRAINED_ROOT / "toy-wan" / "transformer").eval()
    frames, tokens = 25, 16  # 16x16 latents, patches of 4x4
    assert toytrain.window_mask(toytrain.NATIVE_LATENT, tokens) is None
    x = torch.randn(1, 16, frames, 16, 16, generator=torch.Generator().manual_seed(0))
    changed = x.clone()
    changed[:, :, -1] += 1  # the last latent frame
    text = torch.randn(1, 32, 32, generator=torch.Generator().manual_seed(1))

    def outputs(processor):
        model.set_attn_processor(processor)
        with torch.no_grad():
            return [model(hidden_states=v, timestep=torch.tensor([500.0]), encoder_hidden_states=text,
                          return_dict=False)[0] for v in (x, changed)]

    windowed = toytrain.WindowedSelfAttention()
    windowed.mask = toytrain.window_mask(frames, tokens)
    masked, unmasked = outputs(windowed), outputs(toytrain.WindowedSelfAttention())  # mask None: full attention
    # 6 layers of windows that reach 2 frames on (4 at the start): frame f sees up to f + 14 at most
    assert torch.equal(masked[0][:, :, :frames - 15], masked[1][:, :, :frames - 15])
    assert not torch.allclose(masked[0][:, :, -2], masked[1][:, :, -2])
    assert not torch.allclose(unmasked[0][:, :, 0], unmasked[1][:, :, 0], atol=1e-6)

    run = tmp_path / "run"
    shutil.copytree(presets.TRAINED_ROOT / "toy-wan" / "vae", run / "vae")
    toytrain.main(["--out", str(run), "--phase", "latents", "--clips", "16", "--clip-frames", "33",
                   "--keep-latent-stats"])
    toytrain.main(["--out", str(run), "--phase", "transformer", "--transformer-steps", "20", "--batch", "4"])
    record = json.loads((run / "transformer_loss.json").read_text())
    assert record["latent_frames"] == 9
    before, after = record["fixed_batch"]  # 16 whole 33-frame videos under the window, same noise
    assert after < 0.8 * before, (before, after)


def test_a_folder_of_toy_wan_weights_is_judged_at_its_trained_length(tmp_path):
    """A diffusers folder's configs say its architecture, not the length it was trained on: the
    folder's clipmesh.json (toytrain's export writes it) says it, for the coordinator (no torch)
    and the worker alike; without it a toy-wan folder by path was planned as Wan (21 latent
    frames: clip_parallel within that length is exact, so retrained weights were misjudged)."""
    import shutil

    import pytest

    from clipmesh import presets
    from clipmesh.worker.adapters import load_adapter

    folder = tmp_path / "weights"
    shutil.copytree(presets.TRAINED_ROOT / "toy-wan", folder)
    limits = presets.model_limits(str(folder))
    assert limits["native_latent_frames"] == 5 and limits["block_pipeline_defaults"] == {"block_frames": 3, "context_frames": 1}
    info = load_adapter(folder, "cpu").model_info("my-toy")  # the folder says it, whatever the name served
    assert info.native_latent_frames == 5 and info.block_pipeline_defaults.block_frames == 3
    declared = (folder / presets.DECLARED_LIMITS).read_text()
    (folder / presets.DECLARED_LIMITS).unlink()
    assert presets.model_limits(str(folder))["native_latent_frames"] == 21  # what the configs alone say
    (folder / presets.DECLARED_LIMITS).write_text(declared.replace("5", "0"))
    with pytest.raises(ValueError, match="clipmesh.json.*native_latent_frames"):
        presets.model_limits(str(folder))
