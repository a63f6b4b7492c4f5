"""A small, fully known video world and the detector that reads it back (numpy only).

Why: every preset has random weights, so nothing a person sees tells them the system works,
and an approximation (dual-scope attention, a step cache, block_pipeline's context) can only be
judged by its distance to `exact`. In this world a prompt names what a video must show ("a red
circle moving right"), and a colour-segmenting detector measures whether it does: per frame
the shape's presence, colour, kind and centroid; from the track, prompt accuracy, smoothness,
the jump at clip boundaries, and per window of the model's native length the direction and
speed (window_motion). The toy-wan preset is trained on it (clipmesh.toytrain), and
bench/quality.py measures every strategy with it.

The world is a torus: a shape moves at a constant speed (SPEED) forever, and what leaves the
frame on one side re-enters on the other. So what a video of any length should show is defined
at every frame, not only for the ~20 frames a straight path takes to leave a 64-pixel frame.
Wrap-around rather than bouncing: with wrap-around "moving right" stays true at every frame of
every length, and every window of a video has the same known truth (the prompt's direction at
SPEED); a bounce would reverse the motion and contradict the prompt half the time. The detector
works on the torus too: the centroid is a circular mean per axis (one centroid for a shape split
across an edge), the kind is measured on the frame rolled to put the shape at the centre, and a
track's steps are minimal images (differences wrapped into [-side/2, side/2)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BACKGROUND = (24, 24, 32)  # a plain dark background: every shape colour stands out from it
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}
# of a shape's bounding square, the share it fills: how the detector tells the shapes apart
FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
# Every shape's speed, in pixels per frame at side 64 (scaled by side / 64: expected_speed).
# 1.5: 6 pixels per latent frame (Wan's VAE strides 4 frames in time, 4 pixels in space), so
# the motion is 1.5 latent pixels per latent frame, visible to the transformer; 24 pixels (a
# third of the frame) over a 17-frame clip; once round the torus in ~43 frames, so a 257-frame
# video wraps ~6 times. It is the middle of the speeds the first world drew (~0.9-2.1), which
# the shipped weights learned, so they can be fine-tuned on it.
SPEED = 1.5


def expected_speed(side: int = 64) -> float:
    """Every shape's speed in a `side`-pixel world, pixels per frame: the truth for window_motion."""
    return SPEED * side / 64


@dataclass(frozen=True)
class Scene:
    """One shape moving in a straight line at a constant speed (pixels per frame, at `side`) on
    the torus: its centre at frame f is start + f * speed * direction, taken modulo the side
    when rendered (centre() itself is not wrapped: it is the unwrapped path)."""

    shape: str
    colour: str
    direction: str
    speed: float
    start: tuple[float, float]  # centre at frame 0, in pixels
    size: float                 # radius / half side, in pixels

    @property
    def prompt(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction}"

    def centre(self, frame: int) -> tuple[float, float]:
        dx, dy = DIRECTIONS[self.direction]
        return self.start[0] + dx * self.speed * frame, self.start[1] + dy * self.speed * frame


def scene_of(prompt: str) -> Scene:
    """The scene a prompt names ("a red circle moving right"), for scoring: the world's speed
    (at side 64) and what the prompt says; no start or size. ValueError naming the allowed words
    otherwise."""
    words = prompt.split()
    if len(words) != 5 or words[1] not in COLOURS or words[2] not in SHAPES or words[4] not in DIRECTIONS:
        raise ValueError(f"a prompt of the toy world reads \"a COLOUR SHAPE moving DIRECTION\" with COLOUR in "
                         f"{', '.join(COLOURS)}, SHAPE in {', '.join(SHAPES)}, DIRECTION in {', '.join(DIRECTIONS)}; "
                         f"got {prompt!r}")
    return Scene(words[2], words[1], words[4], speed=SPEED, start=(0.0, 0.0), size=0.0)


def sample_scene(rng: np.random.Generator, side: int, frames: int = 0) -> Scene:
    """A scene on the `side` x `side` torus: a shape, colour and direction drawn uniformly, its
    start anywhere, its size 12-18% of the side, its speed the world's (expected_speed). `frames`
    is no longer used (any length is defined) and is kept for callers that pass it."""
    shape, colour = SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))]
    direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    size = float(rng.uniform(0.12, 0.18) * side)
    start = (float(rng.uniform(0, side)), float(rng.uniform(0, side)))
    return Scene(shape, colour, direction, expected_speed(side), start, size)


def wrap(d, side: float):
    """Differences as minimal images on the torus: into [-side/2, side/2)."""
    return (np.asarray(d, float) + side / 2) % side - side / 2


def render(scene: Scene, frames: int, side: int) -> np.ndarray:
    """uint8 [frames, side, side, 3]; shapes are anti-aliased over a 4x4 supersample. Periodic:
    every subpixel is measured against the shape's nearest image on the torus (its offset from
    the centre wrapped into [-side/2, side/2)), which is the shape drawn at its centre modulo the
    side and at its images shifted by +-side in x and y: one crossing an edge shows in two (at a
    corner four) parts. Exact for shapes smaller than half the side (all of sample_scene's)."""
    sub = 4
    coords = (np.arange(side * sub) + 0.5) / sub
    video = np.empty((frames, side, side, 3), dtype=np.uint8)
    colour, background = np.array(COLOURS[scene.colour], float), np.array(BACKGROUND, float)
    for f in range(frames):
        cx, cy = scene.centre(f)
        dx, dy = np.meshgrid(wrap(coords - cx, side), wrap(coords - cy, side))
        inside = _mask(scene.shape, dx, dy, scene.size)
        cover = inside.reshape(side, sub, side, sub).mean(axis=(1, 3))[..., None]
        video[f] = np.round(background + cover * (colour - background)).astype(np.uint8)
    return video


def _mask(shape: str, dx: np.ndarray, dy: np.ndarray, size: float) -> np.ndarray:
    if shape == "circle":
        return dx ** 2 + dy ** 2 <= size ** 2
    if shape == "square":
        return (np.abs(dx) <= size) & (np.abs(dy) <= size)
    # an upright triangle in the bounding square: apex at the top, base at the bottom
    return (dy <= size) & (dy >= -size) & (np.abs(dx) <= (dy + size) / 2)


@dataclass(frozen=True)
class Detection:
    present: bool
    colour: str = ""
    shape: str = ""
    centroid: tuple[float, float] = (math.nan, math.nan)  # in [0, side) on the torus
    area: float = 0.0  # pixels
    side: int = 64     # the frame's side: the torus the centroid lives on


def detect(frame: np.ndarray, min_area: float = 6.0) -> Detection:
    """The frame's shape: pixels nearer a palette colour than the background, the palette colour
    most of them are nearest, their centroid on the torus, and the shape whose fill of its
    bounding box fits.

    The centroid: a circular mean per axis (weights: each pixel's cover by the shape) finds where
    the shape is, even split across an edge; the frame is then rolled (np.roll) to put that point
    at the centre, where the shape is whole, and the plain cover-weighted mean there (exact for
    any shape, a triangle's too) is shifted back, modulo the side. The kind is measured on the
    same rolled frame. Pixels spread over the whole frame (noise) have no circular mean: their
    centroid is nan (present, but nowhere)."""
    side_y, side_x = frame.shape[:2]
    pixels = frame.reshape(-1, 3).astype(float)
    palette = np.array([BACKGROUND, *COLOURS.values()], float)
    nearest = np.linalg.norm(pixels[:, None] - palette[None], axis=-1).argmin(axis=1)
    shape_pixels = nearest > 0
    if shape_pixels.sum() < min_area:
        return Detection(False, side=side_x)
    colour = list(COLOURS)[np.bincount(nearest[shape_pixels], minlength=len(palette))[1:].argmax()]
    # each pixel's cover by the shape (its share of the way from the background to the colour):
    # anti-aliased edges give a sub-pixel centroid and area
    towards = np.array(COLOURS[colour], float) - palette[0]
    cover = np.clip((pixels - palette[0]) @ towards / (towards @ towards), 0.0, 1.0).reshape(side_y, side_x)
    area = float(cover.sum())
    if area <= 0:
        return Detection(False, side=side_x)
    centre = []
    for axis, side in ((1, side_x), (0, side_y)):  # x, then y
        weights = cover.sum(axis=1 - axis)
        angle = 2 * np.pi * (np.arange(side) + 0.5) / side
        c, s = (weights * np.cos(angle)).sum() / area, (weights * np.sin(angle)).sum() / area
        if math.hypot(c, s) < 0.5:  # mass all round the axis: no one place
            centre = None
            break
        centre.append(math.atan2(s, c) % (2 * np.pi) * side / (2 * np.pi) - 0.5)
    mask = shape_pixels.reshape(side_y, side_x)
    if centre is None:
        shift = (0, 0)
        centroid = (math.nan, math.nan)
    else:
        shift = (side_y // 2 - int(round(centre[1])), side_x // 2 - int(round(centre[0])))
        rolled = np.roll(cover, shift, axis=(0, 1))
        ys, xs = np.arange(side_y) + 0.5, np.arange(side_x) + 0.5
        centroid = (float((rolled.sum(axis=0) * xs).sum() / area - shift[1]) % side_x,
                    float((rolled.sum(axis=1) * ys).sum() / area - shift[0]) % side_y)
    by, bx = np.nonzero(np.roll(mask, shift, axis=(0, 1)))
    fill = len(bx) / ((bx.max() - bx.min() + 1) * (by.max() - by.min() + 1))
    shape = min(FILL, key=lambda s: abs(FILL[s] - fill))
    return Detection(True, colour, shape, centroid, area, side_x)


def track(video: np.ndarray) -> list[Detection]:
    return [detect(frame) for frame in video]


def _points(detections: list[Detection]) -> np.ndarray:
    return np.array([d.centroid if d.present else (math.nan, math.nan) for d in detections], float).reshape(-1, 2)


def _side(detections: list[Detection]) -> int:
    return detections[0].side if detections else 64


def steps_of(detections: list[Detection]) -> np.ndarray:
    """[frames - 1, 2]: the centroid's step from each frame to the next, as the minimal image on
    the torus (nan where either frame has no centroid)."""
    return wrap(np.diff(_points(detections), axis=0), _side(detections))


def unwrapped(detections: list[Detection]) -> tuple[np.ndarray, np.ndarray]:
    """The frames with a centroid and the track through them unwrapped off the torus: the first
    point, then the sum of the minimal-image steps between consecutive points (a gap of several
    frames is one step: right while the shape moves less than half the side in it)."""
    points = _points(detections)
    frames = np.flatnonzero(np.isfinite(points).all(axis=1))
    if len(frames) == 0:
        return frames, np.zeros((0, 2))
    steps = wrap(np.diff(points[frames], axis=0), _side(detections))
    return frames, points[frames[0]] + np.concatenate([np.zeros((1, 2)), np.cumsum(steps, axis=0)])


def _named(dx: float, dy: float) -> str:
    return max(DIRECTIONS, key=lambda name: DIRECTIONS[name][0] * dx + DIRECTIONS[name][1] * dy)


def direction_of(detections: list[Detection]) -> str:
    """The named direction nearest the centroid's overall displacement, unwrapped on the torus
    ('' if it hardly moved)."""
    frames, path = unwrapped(detections)
    if len(frames) < 2:
        return ""
    dx, dy = path[-1] - path[0]
    if math.hypot(dx, dy) < 1.0:
        return ""
    return _named(dx, dy)


def prompt_accuracy(detections: list[Detection], scene: Scene) -> dict[str, float]:
    """Shares of frames with the shape present, of the right colour, of the right kind; and
    whether the track moves the named way (1.0 / 0.0)."""
    present = [d for d in detections if d.present]
    n = max(len(detections), 1)
    return dict(present=len(present) / n,
                colour=sum(d.colour == scene.colour for d in present) / n,
                shape=sum(d.shape == scene.shape for d in present) / n,
                direction=float(direction_of(detections) == scene.direction))


def window_motion(detections: list[Detection], window: int, scene: Scene | str,
                  speed: float | None = None, stride: int | None = None) -> dict[str, float]:
    """The motion's truth checked in every window of `window` frames (the model's native length:
    17 for toy-wan), at `stride` (default window // 2) over the whole video, the last window
    ending at the last frame; a video shorter than a window is one window.

    In each window the track is unwrapped (minimal-image steps summed) between its first and
    last frames with a centroid, and its net displacement read:
      direction    the share of windows whose displacement's nearest named direction is the
                   prompt's (`scene`: a Scene or a direction's name)
      speed_error  the mean over windows of |v - speed| / speed, where v is the displacement
                   projected on the prompt's direction per frame (so a reversed motion reads
                   -speed and errs by 2, a stopped one by 1); `speed` defaults to the world's
                   (expected_speed at the frames' side)
      windows      how many windows there were
    A window with a centroid in fewer than half its frames counts as wrong in direction, and
    errs by 1.0 in speed."""
    direction = scene if isinstance(scene, str) else scene.direction
    side = _side(detections)
    speed = expected_speed(side) if speed is None else speed
    n = len(detections)
    window = max(2, min(window, n))
    stride = max(1, stride or window // 2)
    starts = list(range(0, n - window + 1, stride))
    if not starts or starts[-1] != n - window:
        starts.append(n - window)
    ux, uy = DIRECTIONS[direction]
    right, errors = [], []
    for start in starts:
        frames, path = unwrapped(detections[start:start + window])
        if n < 2 or len(frames) < max(2, math.ceil(window / 2)):
            right.append(False)
            errors.append(1.0)
            continue
        dx, dy = path[-1] - path[0]
        right.append(math.hypot(dx, dy) >= 1.0 and _named(dx, dy) == direction)
        along = (dx * ux + dy * uy) / (frames[-1] - frames[0])
        errors.append(abs(along - speed) / speed)
    return dict(direction=float(np.mean(right)), speed_error=float(np.mean(errors)), windows=len(starts))


def identity_kept(detections: list[Detection]) -> float:
    """Share of the frames with a shape whose colour and kind are the video's most common pair:
    1.0 when one object stays itself throughout (whatever the prompt asked)."""
    pairs = [(d.colour, d.shape) for d in detections if d.present]
    return max(pairs.count(p) for p in set(pairs)) / len(pairs) if pairs else 0.0


def step_lengths(detections: list[Detection]) -> np.ndarray:
    """|centroid(f+1) - centroid(f)| for each pair of frames, the minimal image on the torus
    (nan where one frame has no shape)."""
    return np.linalg.norm(steps_of(detections), axis=1)


def smoothness(detections: list[Detection]) -> float:
    """Mean |second difference| of the centroid track (of its minimal-image steps), in pixels
    per frame^2 (0: uniform motion)."""
    second = np.linalg.norm(np.diff(steps_of(detections), axis=0), axis=1)
    return float(np.nanmean(second)) if np.isfinite(second).any() else math.nan


def seam_jump_ratio(video: np.ndarray, detections: list[Detection], boundaries: list[int]) -> dict[str, float]:
    """Jumps at clip boundaries vs inside clips: `boundaries` are the first frames of every clip
    after the first. Track: mean deviation of a step from the median step, boundary / interior;
    pixels: mean |frame(f) - frame(f-1)|, boundary / interior. 1.0: a seam is like any frame."""
    steps = step_lengths(detections)
    typical = np.nanmedian(steps) if np.isfinite(steps).any() else math.nan
    deviation = np.abs(steps - typical)
    pixel = np.abs(np.diff(video.astype(float), axis=0)).mean(axis=(1, 2, 3))
    at = np.zeros(len(steps), bool)
    at[[b - 1 for b in boundaries if 0 < b < len(video)]] = True

    def ratio(values: np.ndarray) -> float:
        if not at.any() or at.all():
            return math.nan
        inside = np.nanmean(values[~at])
        return float(np.nanmean(values[at]) / inside) if inside > 0 else math.inf

    return dict(track=ratio(deviation + 1e-3), pixels=ratio(pixel + 1e-3))


def frame_strip(video: np.ndarray, count: int = 9, scale: int = 2, gap: int = 2) -> np.ndarray:
    """`count` evenly spaced frames side by side (nearest-neighbour `scale`x), for a README."""
    picks = np.linspace(0, len(video) - 1, min(count, len(video))).round().astype(int)
    tiles = [video[i].repeat(scale, axis=0).repeat(scale, axis=1) for i in picks]
    spacer = np.full((tiles[0].shape[0], gap, 3), 255, np.uint8)
    return np.concatenate([part for tile in tiles for part in (tile, spacer)][:-1], axis=1)


def main(argv: list[str] | None = None) -> int:
    """python -m clipmesh.toyworld read VIDEO "a red circle moving right"   what the detector sees
       python -m clipmesh.toyworld strip VIDEO OUT.png                      a strip of its frames"""
    import argparse

    import imageio.v3 as iio

    ap = argparse.ArgumentParser(prog="python -m clipmesh.toyworld", description=main.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    read = sub.add_parser("read", help="the detector's reading of a video against a prompt")
    read.add_argument("video")
    read.add_argument("prompt", help='"a COLOUR SHAPE moving DIRECTION"')
    read.add_argument("--window", type=int, default=17, help="frames per window of the motion's check (the model's native length)")
    strip = sub.add_parser("strip", help="a PNG strip of a video's frames")
    strip.add_argument("video")
    strip.add_argument("output")
    strip.add_argument("--frames", type=int, default=9)
    args = ap.parse_args(argv)
    video = iio.imread(args.video)
    if args.command == "strip":
        iio.imwrite(args.output, frame_strip(video, args.frames))
        print(f"wrote {args.output}")
        return 0
    try:
        scene = scene_of(args.prompt)
    except ValueError as exc:
        ap.error(str(exc))
    detections = track(video)
    scores = prompt_accuracy(detections, scene)
    print(f"{len(video)} frames; a shape in {scores['present']:.0%}, {scene.colour} in {scores['colour']:.0%}, "
          f"a {scene.shape} in {scores['shape']:.0%}; it moves {direction_of(detections) or 'nowhere'} "
          f"(asked: {scene.direction}); smoothness {smoothness(detections):.2f} px/frame²")
    motion = window_motion(detections, args.window, scene)
    print(f"in {motion['windows']} window{'s' * (motion['windows'] != 1)} of {min(args.window, len(video))} frames: the asked direction in "
          f"{motion['direction']:.0%}, speed off by {motion['speed_error']:.0%} of {expected_speed(video.shape[2]):g} px/frame")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
