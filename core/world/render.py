"""Drawing a `Scene` with PIL: flat shapes on a dark background, antialiased by 4x supersampling.

Deterministic: the same scene and size give the same pixels (PIL's rasteriser has no randomness).
Sizes are fractions of a grid cell, so any image size works; 64 px gives ~12 px small and ~18 px
large shapes, each inside its own 21 px cell.
"""

from __future__ import annotations

import math

from PIL import Image, ImageDraw

from vlbridge.world.scene import COLOURS, GRID, Scene, WorldObject

BACKGROUND = (28, 28, 32)
SUPERSAMPLE = 4
RADIUS = {"small": 0.28, "large": 0.42}  # of a cell's side: the shape's circumscribed radius
MARGIN = 0.06  # of a cell's side: the least gap between a shape and its cell's border


def render_scene(scene: Scene, image_size: int = 64) -> Image.Image:
    """The scene as an RGB image of `image_size` pixels square."""
    big = image_size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    cell = big / GRID
    for obj in scene.objects:
        _draw(draw, obj, cell)
    return canvas.reduce(SUPERSAMPLE)  # box filter: the antialiased image


def centre_and_radius(obj: WorldObject, cell: float) -> tuple[float, float, float]:
    """Where the shape goes: its cell's centre moved by the jitter, so it never leaves the cell."""
    radius = RADIUS[obj.size] * cell
    slack = max(0.0, cell / 2 - radius - MARGIN * cell)
    x = (obj.col + 0.5) * cell + obj.dx * slack
    y = (obj.row + 0.5) * cell + obj.dy * slack
    return x, y, radius


def _draw(draw: ImageDraw.ImageDraw, obj: WorldObject, cell: float) -> None:
    x, y, r = centre_and_radius(obj, cell)
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif obj.shape == "square":
        half = r / math.sqrt(2) * 1.1  # a little over the inscribed square, for a similar area
        draw.rectangle((x - half, y - half, x + half, y + half), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon(_regular(x, y + 0.15 * r, r * 1.1, 3), fill=fill)
    elif obj.shape == "star":
        draw.polygon(_star(x, y, r * 1.1, r * 0.45), fill=fill)
    elif obj.shape == "cross":
        arm = r * 0.33
        draw.rectangle((x - r, y - arm, x + r, y + arm), fill=fill)
        draw.rectangle((x - arm, y - r, x + arm, y + r), fill=fill)
    else:
        raise ValueError(f"no drawing for shape {obj.shape!r}")


def _regular(x: float, y: float, r: float, sides: int) -> list[tuple[float, float]]:
    """Vertices of a regular polygon with a vertex pointing up."""
    return [(x + r * math.sin(2 * math.pi * k / sides), y - r * math.cos(2 * math.pi * k / sides)) for k in range(sides)]


def _star(x: float, y: float, outer: float, inner: float) -> list[tuple[float, float]]:
    """A five-pointed star: outer and inner vertices alternating, a point up."""
    points = []
    for k in range(10):
        radius = outer if k % 2 == 0 else inner
        angle = math.pi * k / 5
        points.append((x + radius * math.sin(angle), y - radius * math.cos(angle)))
    return points
