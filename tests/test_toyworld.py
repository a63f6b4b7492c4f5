"""The toy world (clipmesh.toyworld) and its detector: what it renders, the detector reads back.
The metrics that judge the trained model are only as good as this, so each is checked on videos
whose answer is known, and on broken ones it must catch. The world is a torus (a shape leaving
one side re-enters on the other), so videos of any length have a known truth: checked at the
model's native 17 frames and at 15x that."""

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


def reads_back(scene: toyworld.Scene, frames: int) -> list[toyworld.Detection]:
    detections = toyworld.track(toyworld.render(scene, frames, SIDE))
    accuracy = toyworld.prompt_accuracy(detections, scene)
    assert accuracy == dict(present=1.0, colour=1.0, shape=1.0, direction=1.0), (scene, accuracy)
    motion = toyworld.window_motion(detections, FRAMES, scene)
    assert motion["direction"] == 1.0 and motion["speed_error"] < 0.05, (scene, motion)
    offset = scene.size / 3 if scene.shape == "triangle" else 0.0  # a triangle's centroid sits toward its base
    for f, d in enumerate(detections):
        cx, cy = scene.centre(f)  # unwrapped: compared modulo the side
        assert math.hypot(*toyworld.wrap(np.subtract(d.centroid, (cx, cy + offset)), SIDE)) < 0.6, (scene, f, d)
        assert 0 <= d.centroid[0] < SIDE and 0 <= d.centroid[1] < SIDE
    assert toyworld.smoothness(detections) < 0.3
    assert toyworld.identity_kept(detections) == 1.0
    return detections


def test_the_detector_reads_back_what_was_rendered(scenes):
    for scene in scenes:
        detections = reads_back(scene, FRAMES)
        assert toyworld.window_motion(detections, FRAMES, scene)["windows"] == 1


def test_a_long_video_reads_back_too_every_window_with_the_prompts_motion(scenes):
    """255 frames (15 clips' worth): each shape goes round the torus ~6 times, and every window
    of 17 frames still moves the prompt's way at the world's speed."""
    for scene in scenes[:6]:
        detections = reads_back(scene, 15 * FRAMES)
        assert toyworld.window_motion(detections, FRAMES, scene)["windows"] == 31  # at 0, 8, .., 232 and the last at 238
        steps = toyworld.step_lengths(detections)
        assert np.abs(steps - toyworld.SPEED).max() < 0.3  # minimal images: no step of ~side at an edge


def test_scenes_start_anywhere_move_at_the_worlds_speed_and_prompts_say_them(scenes):
    starts = np.array([s.start for s in scenes])
    assert (starts >= 0).all() and (starts < SIDE).all() and starts.min() < SIDE / 4 and starts.max() > 3 * SIDE / 4
    for scene in scenes:
        assert scene.speed == toyworld.SPEED == toyworld.expected_speed(SIDE)
        assert scene.prompt == f"a {scene.colour} {scene.shape} moving {scene.direction}"
    assert len({s.prompt for s in scenes}) > 12
    assert toyworld.expected_speed(128) == 2 * toyworld.SPEED
    assert toyworld.scene_of("a red circle moving up").speed == toyworld.SPEED


@pytest.mark.parametrize("shape,start,parts", [("circle", (0.5, 30.0), "x"), ("triangle", (40.0, 63.0), "y"),
                                               ("square", (63.0, 1.0), "xy")])
def test_a_shape_across_an_edge_is_one_shape_with_one_centroid(shape, start, parts):
    """Split across an edge (or a corner: four parts), the shape is drawn in parts on both sides,
    and the detector still finds one centroid (modulo the side) and the right kind."""
    scene = toyworld.Scene(shape, "yellow", "right", toyworld.SPEED, start, 9.0)
    frame = toyworld.render(scene, 1, SIDE)[0]
    on = (np.abs(frame.astype(int) - toyworld.BACKGROUND).sum(-1) > 60)
    for axis in parts:  # shape pixels at both ends of each axis it crosses
        line = on.any(axis=0) if axis == "x" else on.any(axis=1)
        assert line[0] and line[-1] and not line.all(), (axis, line)
    d = toyworld.detect(frame)
    offset = scene.size / 3 if shape == "triangle" else 0.0
    assert d.present and d.shape == shape and d.colour == "yellow", d
    assert math.hypot(*toyworld.wrap(np.subtract(d.centroid, (start[0], start[1] + offset)), SIDE)) < 0.6, d


@pytest.mark.parametrize("then", ["stops", "reverses"])
def test_a_motion_that_stops_or_reverses_half_way_fails_the_window_check(then):
    """The per-window check can fail: moving right for half the video, then standing still or
    moving left, the whole video still reads "right" but only about half its windows do, and
    the speed is off in the rest."""
    frames, half = 8 * FRAMES, 4 * FRAMES
    right = toyworld.Scene("circle", "red", "right", toyworld.SPEED, (10.0, 32.0), 8.0)
    video = toyworld.render(right, frames, SIDE)
    if then == "stops":
        video[half:] = video[half - 1]
    else:
        left = toyworld.Scene("circle", "red", "left", toyworld.SPEED, right.centre(half - 1), 8.0)
        video[half - 1:] = toyworld.render(left, frames - half + 1, SIDE)
    detections = toyworld.track(video)
    motion = toyworld.window_motion(detections, FRAMES, right)
    assert 0.35 <= motion["direction"] <= 0.65 and motion["speed_error"] > 0.4, motion
    if then == "stops":
        assert toyworld.direction_of(detections) == "right"  # the whole video's reading misses it
    good = toyworld.window_motion(toyworld.track(toyworld.render(right, frames, SIDE)), FRAMES, right)
    assert good["direction"] == 1.0 and good["speed_error"] < 0.05


def test_windows_without_a_shape_count_as_wrong():
    blank = np.broadcast_to(np.array(toyworld.BACKGROUND, np.uint8), (2 * FRAMES, SIDE, SIDE, 3))
    motion = toyworld.window_motion(toyworld.track(blank), FRAMES, "right")
    assert motion == dict(direction=0.0, speed_error=1.0, windows=4)


def test_an_empty_frame_has_no_shape_and_noise_is_not_a_prompt():
    blank = np.broadcast_to(np.array(toyworld.BACKGROUND, np.uint8), (SIDE, SIDE, 3))
    assert not toyworld.detect(blank).present
    noise = np.random.default_rng(1).integers(0, 256, (FRAMES, SIDE, SIDE, 3), dtype=np.uint8)
    scene = toyworld.Scene("circle", "red", "right", 1.0, (20.0, 32.0), 8.0)
    detections = toyworld.track(noise)
    accuracy = toyworld.prompt_accuracy(detections, scene)
    assert accuracy["shape"] < 0.5 and accuracy["colour"] < 0.5 and accuracy["direction"] == 0.0
    assert toyworld.window_motion(detections, FRAMES, scene)["direction"] == 0.0


def test_a_seam_shows_in_the_jump_ratio():
    scene = toyworld.Scene("square", "blue", "right", 1.5, (12.0, 32.0), 7.0)
    smooth = toyworld.render(scene, FRAMES, SIDE)
    jumped = smooth.copy()
    jumped[9:] = toyworld.render(toyworld.Scene("square", "blue", "right", 1.5, (20.0, 32.0), 7.0), FRAMES, SIDE)[9:]
    clean = toyworld.seam_jump_ratio(smooth, toyworld.track(smooth), [9])
    broken = toyworld.seam_jump_ratio(jumped, toyworld.track(jumped), [9])
    assert clean["track"] < 3 and 0.5 < clean["pixels"] < 2
    assert broken["track"] > 10 and broken["pixels"] > 2


def test_crossing_an_edge_is_no_seam():
    """A shape wrapping round the torus at a clip boundary: its step there is the minimal image
    (the world's speed), not a jump of a frame's width."""
    scene = toyworld.Scene("square", "blue", "left", 1.5, (12.0, 32.0), 7.0)  # at x=0 about frame 8
    video = toyworld.render(scene, FRAMES, SIDE)
    detections = toyworld.track(video)
    assert max(d.centroid[0] for d in detections) > SIDE - 8  # it did wrap
    assert toyworld.seam_jump_ratio(video, detections, [9])["track"] < 3


def test_identity_kept_sees_an_object_change():
    red = toyworld.render(toyworld.Scene("circle", "red", "right", 1.0, (14.0, 32.0), 8.0), FRAMES, SIDE)
    green = toyworld.render(toyworld.Scene("square", "green", "right", 1.0, (14.0, 32.0), 8.0), FRAMES, SIDE)
    switched = np.concatenate([red[:12], green[12:]])
    assert toyworld.identity_kept(toyworld.track(switched)) == pytest.approx(12 / 17)
