"""A small, fully known video world and the detector that reads it back (numpy only).

Why: every preset has random weights, so nothing a person sees tells them the system works,
and an approximation (dual-scope attention, a step cache, block_pipeline's context) can only be
judged by its distance to `exact`. In this world a prompt names what a video must show ("a red
circle moving right"), and a colour-segmenting detector measures whether it does: per frame
the shape's presence, colour, kind and centroid; from the track, prompt accuracy, smoothness and
the jump at clip boundaries. The toy-wan preset is trained on it (clipmesh.toytrain), and
bench/quality.py measures every strategy with it.
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


@dataclass(frozen=True)
class Scene:
    """One shape moving in a straight line at a constant speed (pixels per frame, at `side`)."""

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
    """The scene a prompt names ("a red circle moving right"), for scoring: no path, only what
    the prompt says. ValueError naming the allowed words otherwise."""
    words = prompt.split()
    if len(words) != 5 or words[1] not in COLOURS or words[2] not in SHAPES or words[4] not in DIRECTIONS:
        raise ValueError(f"a prompt of the toy world reads \"a COLOUR SHAPE moving DIRECTION\" with COLOUR in "
                         f"{', '.join(COLOURS)}, SHAPE in {', '.join(SHAPES)}, DIRECTION in {', '.join(DIRECTIONS)}; "
                         f"got {prompt!r}")
    return Scene(words[2], words[1], words[4], speed=0.0, start=(0.0, 0.0), size=0.0)


def sample_scene(rng: np.random.Generator, side: int, frames: int) -> Scene:
    """A scene whose shape stays wholly inside a `side` x `side` frame for all `frames` frames."""
    shape, colour = SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))]
    direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    size = float(rng.uniform(0.12, 0.18) * side)
    travel = side - 2 * size - 2
    speed = float(rng.uniform(0.35, 0.8) * travel / max(frames - 1, 1))
    dx, dy = DIRECTIONS[direction]
    along = size + 1 + (travel - speed * (frames - 1)) * rng.uniform(0, 1)  # where the path begins
    across = float(rng.uniform(size + 1, side - size - 1))
    x0 = along if dx > 0 else side - along if dx < 0 else across
    y0 = along if dy > 0 else side - along if dy < 0 else across
    return Scene(shape, colour, direction, speed, (x0, y0), size)


def render(scene: Scene, frames: int, side: int) -> np.ndarray:
    """uint8 [frames, side, side, 3]; shapes are anti-aliased over a 4x4 supersample."""
    sub = 4
    coords = (np.arange(side * sub) + 0.5) / sub
    x, y = np.meshgrid(coords, coords)
    video = np.empty((frames, side, side, 3), dtype=np.uint8)
    colour, background = np.array(COLOURS[scene.colour], float), np.array(BACKGROUND, float)
    for f in range(frames):
        cx, cy = scene.centre(f)
        inside = _mask(scene.shape, x - cx, y - cy, scene.size)
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
    centroid: tuple[float, float] = (math.nan, math.nan)
    area: float = 0.0  # pixels


def detect(frame: np.ndarray, min_area: float = 6.0) -> Detection:
    """The frame's shape: pixels nearer a palette colour than the background, the palette colour
    most of them are nearest, their centroid, and the shape whose fill of its bounding box fits."""
    pixels = frame.reshape(-1, 3).astype(float)
    palette = np.array([BACKGROUND, *COLOURS.values()], float)
    nearest = np.linalg.norm(pixels[:, None] - palette[None], axis=-1).argmin(axis=1)
    shape_pixels = nearest > 0
    area = float(shape_pixels.sum())
    if area < min_area:
        return Detection(False)
    colour = list(COLOURS)[np.bincount(nearest[shape_pixels], minlength=len(palette))[1:].argmax()]
    # each pixel's cover by the shape (its share of the way from the background to the colour):
    # anti-aliased edges give a sub-pixel centroid and area
    towards = np.array(COLOURS[colour], float) - palette[0]
    cover = np.clip((pixels - palette[0]) @ towards / (towards @ towards), 0.0, 1.0)
    ys, xs = np.divmod(np.arange(len(pixels)), frame.shape[1])
    area = float(cover.sum())
    centroid = (float((cover * xs).sum() / area) + 0.5, float((cover * ys).sum() / area) + 0.5)
    bx, by = xs[shape_pixels], ys[shape_pixels]
    fill = shape_pixels.sum() / ((bx.max() - bx.min() + 1) * (by.max() - by.min() + 1))
    shape = min(FILL, key=lambda s: abs(FILL[s] - fill))
    return Detection(True, colour, shape, centroid, area)


def track(video: np.ndarray) -> list[Detection]:
    return [detect(frame) for frame in video]


def direction_of(detections: list[Detection]) -> str:
    """The named direction nearest the centroid's overall displacement ('' if it hardly moved)."""
    points = [d.centroid for d in detections if d.present]
    if len(points) < 2:
        return ""
    dx, dy = points[-1][0] - points[0][0], points[-1][1] - points[0][1]
    if math.hypot(dx, dy) < 1.0:
        return ""
    return max(DIRECTIONS, key=lambda name: DIRECTIONS[name][0] * dx + DIRECTIONS[name][1] * dy)


def prompt_accuracy(detections: list[Detection], scene: Scene) -> dict[str, float]:
    """Shares of frames with the shape present, of the right colour, of the right kind; and
    whether the track moves the named way (1.0 / 0.0)."""
    present = [d for d in detections if d.present]
    n = max(len(detections), 1)
    return dict(present=len(present) / n,
                colour=sum(d.colour == scene.colour for d in present) / n,
                shape=sum(d.shape == scene.shape for d in present) / n,
                direction=float(direction_of(detections) == scene.direction))


def identity_kept(detections: list[Detection]) -> float:
    """Share of the frames with a shape whose colour and kind are the video's most common pair:
    1.0 when one object stays itself throughout (whatever the prompt asked)."""
    pairs = [(d.colour, d.shape) for d in detections if d.present]
    return max(pairs.count(p) for p in set(pairs)) / len(pairs) if pairs else 0.0


def step_lengths(detections: list[Detection]) -> np.ndarray:
    """|centroid(f+1) - centroid(f)| for each pair of frames (nan where one frame has no shape)."""
    points = np.array([d.centroid for d in detections], float)
    return np.linalg.norm(np.diff(points, axis=0), axis=1)


def smoothness(detections: list[Detection]) -> float:
    """Mean |second difference| of the centroid track, in pixels per frame^2 (0: uniform motion)."""
    points = np.array([d.centroid for d in detections], float)
    second = np.linalg.norm(np.diff(points, n=2, axis=0), axis=1)
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
