"""The toy world (clipmesh.toyworld) and its detector: what it renders, the detector reads back.
The metrics that judge the trained model are only as good as this, so each is checked on videos
whose answer is known, and on a broken one it must catch."""

from __future__ import annotations

import math

import numpy as np
import pytest

from clipmesh import toyworld

SIDE, FRAMES = 64, 17


@pytest.fixture(scope="module")
def scenes():
    rng = np.random.default_rng(0)
    return [toyworld.sample_scene(rng, SIDE, FRAMES) for _ in range(24)]


def test_the_detector_reads_back_what_was_rendered(scenes):
    for scene in scenes:
        detections = toyworld.track(toyworld.render(scene, FRAMES, SIDE))
        accuracy = toyworld.prompt_accuracy(detections, scene)
        assert accuracy == dict(present=1.0, colour=1.0, shape=1.0, direction=1.0), (scene, accuracy)
        offset = scene.size / 3 if scene.shape == "triangle" else 0.0  # a triangle's centroid sits toward its base
        for f, d in enumerate(detections):
            cx, cy = scene.centre(f)
            assert math.hypot(d.centroid[0] - cx, d.centroid[1] - cy - offset) < 0.6, (scene, f, d)
        assert toyworld.smoothness(detections) < 0.3
        assert toyworld.identity_kept(detections) == 1.0


def test_scenes_stay_in_the_frame_and_prompts_say_them(scenes):
    for scene in scenes:
        for f in range(FRAMES):
            x, y = scene.centre(f)
            assert scene.size <= x <= SIDE - scene.size and scene.size <= y <= SIDE - scene.size
        assert scene.prompt == f"a {scene.colour} {scene.shape} moving {scene.direction}"
    assert len({s.prompt for s in scenes}) > 12


def test_an_empty_frame_has_no_shape_and_noise_is_not_a_prompt():
    blank = np.broadcast_to(np.array(toyworld.BACKGROUND, np.uint8), (SIDE, SIDE, 3))
    assert not toyworld.detect(blank).present
    noise = np.random.default_rng(1).integers(0, 256, (FRAMES, SIDE, SIDE, 3), dtype=np.uint8)
    scene = toyworld.Scene("circle", "red", "right", 1.0, (20.0, 32.0), 8.0)
    accuracy = toyworld.prompt_accuracy(toyworld.track(noise), scene)
    assert accuracy["shape"] < 0.5 and accuracy["colour"] < 0.5


def test_a_seam_shows_in_the_jump_ratio():
    scene = toyworld.Scene("square", "blue", "right", 1.5, (12.0, 32.0), 7.0)
    smooth = toyworld.render(scene, FRAMES, SIDE)
    jumped = smooth.copy()
    jumped[9:] = toyworld.render(toyworld.Scene("square", "blue", "right", 1.5, (20.0, 32.0), 7.0), FRAMES, SIDE)[9:]
    clean = toyworld.seam_jump_ratio(smooth, toyworld.track(smooth), [9])
    broken = toyworld.seam_jump_ratio(jumped, toyworld.track(jumped), [9])
    assert clean["track"] < 3 and 0.5 < clean["pixels"] < 2
    assert broken["track"] > 10 and broken["pixels"] > 2


def test_identity_kept_sees_an_object_change():
    red = toyworld.render(toyworld.Scene("circle", "red", "right", 1.0, (14.0, 32.0), 8.0), FRAMES, SIDE)
    green = toyworld.render(toyworld.Scene("square", "green", "right", 1.0, (14.0, 32.0), 8.0), FRAMES, SIDE)
    switched = np.concatenate([red[:12], green[12:]])
    assert toyworld.identity_kept(toyworld.track(switched)) == pytest.approx(12 / 17)
