"""The trained toy-wan preset: it loads offline from the package, its videos show the prompt (read
back by the toy world's detector), and the random-weight tiny-wan's do not; its training,
run short and seeded, learns."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from clipmesh import toyworld


def shows(video: np.ndarray, prompt: str) -> dict:
    """What the detector reads of the prompt in `video` (uint8 [F, H, W, 3]): the share of frames
    with a shape of the prompt's colour, and whether the track moves the prompt's way."""
    detections = toyworld.track(video)
    return dict(toyworld.prompt_accuracy(detections, toyworld.scene_of(prompt)), moved=toyworld.direction_of(detections))


def assert_shows(video: np.ndarray, prompt: str) -> None:
    seen = shows(video, prompt)
    assert seen["present"] >= 0.8 and seen["colour"] >= 0.8, f"{prompt!r}: {seen}"
    assert seen["direction"] == 1.0, f"{prompt!r}: the shape moves {seen['moved'] or 'nowhere'}: {seen}"


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
    assert "it moves right (asked: right)" in outputs[1], outputs[1]
    video = iio.imread(out)
    assert video.shape == (17, 64, 64, 3)
    assert_shows(video, prompt)
    assert not (tmp_path / "cache").exists()  # loaded from the package, nothing built


def pipeline_video(model: str, prompt: str, seed: int) -> np.ndarray:
    """diffusers' own WanPipeline on the preset's folder, in this process."""
    import torch
    from diffusers import WanPipeline

    from clipmesh.presets import model_folder

    pipe = WanPipeline.from_pretrained(model_folder(model), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(prompt, height=64, width=64, num_frames=17, num_inference_steps=8, guidance_scale=5.0,
                  generator=torch.Generator().manual_seed(seed), output_type="np").frames[0]
    return np.round(frames * 255).astype(np.uint8)


def test_other_prompts_show_too_and_random_weights_do_not(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPMESH_CACHE", str(tmp_path / "cache"))  # tiny-wan built afresh, not a cached copy
    for prompt, seed in (("a blue square moving down", 1), ("a yellow triangle moving left", 2)):
        assert_shows(pipeline_video("toy-wan", prompt, seed), prompt)
    with pytest.raises(AssertionError):  # the check is one a random model fails
        assert_shows(pipeline_video("tiny-wan", "a blue square moving down", 1), "a blue square moving down")


def test_a_short_seeded_training_run_learns(tmp_path):
    """Each phase, short (the full run is an hour and not part of CI): the VAE's loss and the
    transformer's flow-matching loss fall, the same seed gives the same curve, and the export
    is a folder WanPipeline loads."""
    def train(out, *args):
        subprocess.run([sys.executable, "-m", "clipmesh.toytrain", "--out", str(out), "--threads", "1", *args],
                       check=True, capture_output=True, timeout=300)

    def record(out, part):
        return json.loads((out / f"{part}_loss.json").read_text())

    run = tmp_path / "run"
    train(run, "--phase", "vae", "--vae-stages", "40x5x2x1e-3")
    vae = record(run, "vae")
    before, after = vae["stages"][0]["held_out"]  # the same held-out clips before and after
    assert after < 0.8 * before, vae["stages"]
    train(run, "--phase", "latents", "--clips", "32")
    train(run, "--phase", "transformer", "--transformer-steps", "60", "--batch", "4")
    before, after = record(run, "transformer")["fixed_batch"]  # the same clips, noise and sigmas
    assert after < 0.8 * before, (before, after)
    for again in ("again", "once more"):  # seeded: the same run gives the same losses
        train(tmp_path / again, "--phase", "vae", "--vae-stages", "4x5x2x1e-3")
    assert record(tmp_path / "again", "vae")["loss"] == record(tmp_path / "once more", "vae")["loss"]

    train(run, "--phase", "export", "--export", str(tmp_path / "folder"))
    from diffusers import WanPipeline
    pipe = WanPipeline.from_pretrained(tmp_path / "folder")
    assert pipe.vae_scale_factor_spatial == 4 and pipe.transformer.config.num_layers == 6
