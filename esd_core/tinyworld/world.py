"""The tiny synthetic world: concepts, synonyms, captions, vocabulary and the drawing function.

Images are 32x32 RGB float arrays in [0, 1]: one shape (circle, square, triangle, star) in one
colour (red, green, blue, yellow), plain or striped, at a random position and size on a random
greyish background (greys never look like one of the four colours, so colour is unambiguous).

Captions name some or all of the three attributes, so every one of these is a valid prompt:
  "a red striped circle", "a red circle", "a striped circle", "a circle",
  "a red shape", "a striped shape", "red", "circle", "" (empty: unconditional).
Every shape and colour has one synonym ("disc" for circle, "crimson" for red, ...), used in about
a third of training captions, so an erasure can be checked for leakage through the other name.
"""
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
SHAPES = ["circle", "square", "triangle", "star"]
COLOURS = ["red", "green", "blue", "yellow"]
TEXTURES = ["plain", "striped"]
SYNONYMS = {
    "circle": "disc", "square": "box", "triangle": "wedge", "star": "pentagram",
    "red": "crimson", "green": "emerald", "blue": "azure", "yellow": "golden",
}
FILLER_WORDS = ["a", "shape"]
VOCABULARY = FILLER_WORDS + TEXTURES + SHAPES + COLOURS + list(SYNONYMS.values())

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "pipeline"
DEFAULT_FLOW_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "flow-pipeline"
TINY_WORLDS = {"sd": DEFAULT_MODEL_DIR, "flow": DEFAULT_FLOW_MODEL_DIR}
DEFAULT_JUDGE_PATH = Path(__file__).resolve().parent / "assets" / "judge.safetensors"

RGB = {
    "red": (0.90, 0.10, 0.10), "green": (0.10, 0.80, 0.15),
    "blue": (0.15, 0.25, 0.95), "yellow": (0.95, 0.90, 0.10),
}
# Colours outside the palette: the judge learns to call these "no colour".
OFF_PALETTE_RGB = [(0.65, 0.15, 0.85), (0.10, 0.85, 0.85), (0.97, 0.97, 0.97), (0.55, 0.40, 0.25)]
SUPERSAMPLE = 4
STRIPE_PERIOD = 6


def kind_of(concept):
    """'shape' or 'colour' for a concept name (a synonym counts as its concept)."""
    concept = canonical(concept)
    if concept in SHAPES:
        return "shape"
    if concept in COLOURS:
        return "colour"
    raise ValueError(f"unknown concept {concept!r}; known: {SHAPES + COLOURS}")


def canonical(word):
    """Map a synonym back to its concept name; other words are returned unchanged."""
    for concept, synonym in SYNONYMS.items():
        if word == synonym:
            return concept
    return word


def _background(rng):
    """A grey background with a gentle random gradient and slight tint, never a palette colour."""
    base = rng.uniform(0.15, 0.6)
    tint = rng.uniform(-0.04, 0.04, size=3)
    ramp = np.linspace(-1, 1, SIZE)
    gx, gy = rng.uniform(-0.12, 0.12, size=2)
    grad = gx * ramp[None, :] + gy * ramp[:, None]
    img = base + grad[:, :, None] + tint[None, None, :]
    return np.clip(img, 0, 1)


def _polygon_mask(points, big):
    """Anti-aliased coverage mask (SIZE x SIZE) of a polygon given in supersampled coordinates."""
    canvas = Image.new("L", (big, big), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in points], fill=255)
    return _downsample(np.asarray(canvas, dtype=np.float32) / 255.0)


def _downsample(mask):
    return mask.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE).mean(axis=(1, 3))


def shape_mask(shape, cx, cy, radius, angle=0.0):
    """Coverage mask of one shape centred at (cx, cy) in pixels, 'radius' = half its extent."""
    s = SUPERSAMPLE
    big = SIZE * s
    cx, cy, r = cx * s, cy * s, radius * s
    if shape == "circle":
        yy, xx = np.mgrid[0:big, 0:big] + 0.5
        return _downsample(((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r).astype(np.float32))
    if shape == "square":
        corners = np.pi / 4 + angle + np.arange(4) * np.pi / 2
        rr = r * 1.2  # a square of half-width 0.85 r: similar area to the circle
    elif shape == "triangle":
        corners = -np.pi / 2 + angle + np.arange(3) * 2 * np.pi / 3
        rr = r * 1.25
    elif shape == "star":
        corners = -np.pi / 2 + angle + np.arange(10) * np.pi / 5
        rr = np.where(np.arange(10) % 2 == 0, r * 1.25, r * 0.5)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    points = np.stack([cx + rr * np.cos(corners), cy + rr * np.sin(corners)], axis=1)
    return _polygon_mask(points, big)


def _fill(rgb, texture, rng):
    """SIZE x SIZE x 3 fill: the colour, or stripes of the colour and a darker shade of it."""
    rgb = np.clip(np.asarray(rgb) + rng.uniform(-0.05, 0.05, size=3), 0, 1)
    fill = np.broadcast_to(rgb, (SIZE, SIZE, 3)).copy()
    if texture == "striped":
        offset = rng.integers(0, STRIPE_PERIOD)
        rows = (np.arange(SIZE) + offset) % STRIPE_PERIOD < STRIPE_PERIOD // 2
        fill[rows] = rgb * 0.35
    return fill


def _composite(img, mask, fill):
    return img * (1 - mask[:, :, None]) + fill * mask[:, :, None]


def draw(shape, colour, texture, rng):
    """Draw one shape image (SIZE x SIZE x 3 float32 in [0, 1]) with random placement and size.

    colour is a palette name or an explicit RGB triple (used for off-palette judge examples).
    """
    radius = rng.uniform(7.0, 11.0)
    margin = radius * 1.2
    cx, cy = rng.uniform(margin, SIZE - margin, size=2)
    angle = rng.uniform(-0.2, 0.2)
    rgb = RGB[colour] if isinstance(colour, str) else colour
    img = _composite(_background(rng), shape_mask(shape, cx, cy, radius, angle), _fill(rgb, texture, rng))
    return img.astype(np.float32)


def draw_blob(rgb, texture, rng):
    """A random irregular blob: a smooth star-convex outline that is none of the four shapes."""
    n = 18
    radius = rng.uniform(6.0, 11.0)
    cx, cy = rng.uniform(radius * 1.1, SIZE - radius * 1.1, size=2)
    harmonics = rng.normal(0, 1, size=(5, 2)) / np.arange(1, 6)[:, None]  # irregular, k = 2..6
    harmonics *= rng.uniform(0.4, 0.6) / np.linalg.norm(harmonics)  # never close to a circle
    theta = np.linspace(0, 2 * np.pi, n, endpoint=False)
    wobble = 1 + sum(a * np.cos((k + 2) * theta) + b * np.sin((k + 2) * theta)
                     for k, (a, b) in enumerate(harmonics))
    rr = radius * np.clip(wobble, 0.4, 1.3) * SUPERSAMPLE
    points = np.stack([cx * SUPERSAMPLE + rr * np.cos(theta), cy * SUPERSAMPLE + rr * np.sin(theta)], axis=1)
    mask = _polygon_mask(points, SIZE * SUPERSAMPLE)
    return _composite(_background(rng), mask, _fill(rgb, texture, rng)).astype(np.float32)


def draw_scribble(rgb, rng):
    """A few random thick strokes: ink without a shape."""
    big = SIZE * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    points = [tuple(p) for p in rng.uniform(0, big, size=(rng.integers(3, 6), 2))]
    ImageDraw.Draw(canvas).line(points, fill=255, width=int(rng.integers(4, 10)))
    mask = _downsample(np.asarray(canvas, dtype=np.float32) / 255.0)
    return _composite(_background(rng), mask, _fill(rgb, "plain", rng)).astype(np.float32)


def draw_background(rng):
    """An empty background: no shape, no colour."""
    return _background(rng).astype(np.float32)


def caption(shape, colour, texture, rng):
    """A random training caption for these attributes (see the module docstring for the forms).

    Each attribute is named with probability ~0.75 (at least one is kept), shapes and colours by
    their synonym a third of the time; a caption without a shape says "shape" instead.
    """
    name_shape, name_colour, name_texture = rng.random(3) < (0.8, 0.8, 0.6)
    if not (name_shape or name_colour or name_texture):
        name_shape = True
    words = []
    if name_colour:
        words.append(SYNONYMS[colour] if rng.random() < 1 / 3 else colour)
    if name_texture:
        words.append(texture)
    if name_shape:
        words.append(SYNONYMS[shape] if rng.random() < 1 / 3 else shape)
    elif len(words) > 1 or rng.random() < 0.5:
        words.append("shape")
    bare_word = len(words) == 1 and rng.random() < 0.5
    return " ".join(words) if bare_word else "a " + " ".join(words)


def random_example(rng):
    """One random (image, attributes) example of the world, attributes as a dict of names."""
    attrs = {"shape": SHAPES[rng.integers(4)], "colour": COLOURS[rng.integers(4)],
             "texture": TEXTURES[rng.integers(2)]}
    return draw(attrs["shape"], attrs["colour"], attrs["texture"], rng), attrs


def to_uint8(img):
    """Float image in [0, 1] to a uint8 array for saving."""
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
