"""A generated VQA set whose images span visual complexity: scenes of 1 to 16 flat shapes (circle, rectangle,
triangle) in 8 colours on a flat or textured light background, with one-word questions about one object.

The answer always needs the detail that grows with the scene: the object asked about must be found among all the
others (its shape or colour is unique in the scene, or the yes/no question binds a colour to a shape while the
scene holds that colour and that shape on other objects). Answers are easy-VQA's 13 words (3 shapes, 8 colours,
yes, no), so a model trained on easy-VQA already has the vocabulary.

Complexity levels (``LEVELS``): 0 = one object, 1 = 2-4, 2 = 5-9, 3 = 10-16 objects. Object sizes shrink with
the count but stay >= ``MIN_SIZE`` px at 224 x 224 (two 14-px patches of DINOv2-S/14, the small VLM's tower).

Balance: the first question of each image comes from a deterministic stratification: every block of
``len(LEVELS) * len(ANSWERS)`` images holds each (level, answer) pair once, in a seeded order, so answers are
uniform overall and within each level (the majority answer is 1/13 of a full block). Question types follow the
answer: a colour answer asks ``what color is the <shape>?`` (that shape once in the scene), a shape answer asks
``what shape is the <colour> object?`` (that colour once), yes/no ask ``is there a <colour> <shape>?``.
Extra questions per image (``questions_per_image > 1``, for training) are drawn from those the scene supports.

Everything is drawn from ``random.Random(f"complexity-vqa-{seed}")``: the same seed gives the same images (pixel
for pixel) and questions. Colours are exact (no anti-aliasing), so a pixel test can check a scene description.

    items = generate(seed=1, count=520)
    write(items, "data/cvqa_seed1")   # images/*.png + questions.json (dymu eval's format) + scenes.json
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

SIZE = 224  # the small VLM's input size: images are drawn at the size the tower sees
MIN_SIZE = 28  # smallest object side, px (2 patches of 14 px)
SHAPES = ("circle", "rectangle", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 20, 20),
    "green": (20, 190, 40),
    "blue": (20, 40, 230),
    "teal": (0, 128, 128),
    "brown": (135, 75, 25),
    "yellow": (245, 225, 0),
    "gray": (128, 128, 128),
    "black": (10, 10, 10),
}
ANSWERS = (*SHAPES, *COLOURS, "yes", "no")
LEVELS = ((1, 1), (2, 4), (5, 9), (10, 16))  # objects per scene, by complexity level
QTYPES = ("color", "shape", "exists")


@dataclass(frozen=True)
class Obj:
    """One drawn object: ``box`` is its bounding square (x0, y0, x1, y1), ``core`` a pixel surely inside it."""

    shape: str
    colour: str
    box: tuple[int, int, int, int]
    core: tuple[int, int]


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    qtype: str  # "color", "shape" or "exists"
    target: int | None  # index into the scene's objects of the object asked about (None: a "no" answer)
    colour: str  # the colour and shape the question names or asks for
    shape: str


@dataclass
class Item:
    """One image, its scene and its questions."""

    index: int
    level: int
    background: str  # "flat" or "textured"
    objects: list[Obj]
    questions: list[QA]
    image: Image.Image = field(repr=False)


# ------------------------------------------------------------------------------------------------ scenes
def _scene_specs(rng: random.Random, n: int, qtype: str, answer: str) -> tuple[list[tuple[str, str]], int | None, str, str]:
    """(shape, colour) of ``n`` objects satisfying the question; the target's index, its colour and shape."""
    colours, shapes = list(COLOURS), list(SHAPES)
    if qtype == "color":
        colour, shape = answer, rng.choice(shapes)
        others = [(rng.choice([s for s in shapes if s != shape]), rng.choice(colours)) for _ in range(n - 1)]
    elif qtype == "shape":
        colour, shape = rng.choice(colours), answer
        others = [(rng.choice(shapes), rng.choice([c for c in colours if c != colour])) for _ in range(n - 1)]
    else:
        colour, shape = rng.choice(colours), rng.choice(shapes)
        pool = [(s, c) for s in shapes for c in colours if (s, c) != (shape, colour)]
        if answer == "no":  # n objects, none of them the pair asked about
            specs = [rng.choice(pool) for _ in range(n)]
            # hard negatives: the colour and the shape are there, on other objects
            if n >= 2:
                specs[0] = (shape, rng.choice([c for c in colours if c != colour]))
                specs[1] = (rng.choice([s for s in shapes if s != shape]), colour)
            rng.shuffle(specs)
            return specs, None, colour, shape
        others = [rng.choice(pool) for _ in range(n - 1)]
    specs = [(shape, colour), *others]
    order = list(range(n))
    rng.shuffle(order)
    return [specs[i] for i in order], order.index(0), colour, shape


def _layout(rng: random.Random, n: int) -> list[tuple[int, int, int]]:
    """``n`` non-overlapping squares (x, y, side) inside the image, 4 px apart; sizes shrink with ``n``."""
    cell = SIZE / math.ceil(math.sqrt(n))
    hi = min(110.0, 0.8 * cell)
    lo = max(float(MIN_SIZE), min(0.55 * cell, 0.6 * hi))
    for _ in range(200):
        boxes: list[tuple[int, int, int]] = []
        for _ in range(n):
            for _ in range(300):
                s = int(rng.uniform(lo, hi))
                x, y = rng.randint(4, SIZE - 4 - s), rng.randint(4, SIZE - 4 - s)
                if all(x + s + 4 <= bx or bx + bs + 4 <= x or y + s + 4 <= by or by + bs + 4 <= y for bx, by, bs in boxes):
                    boxes.append((x, y, s))
                    break
            else:
                break
        if len(boxes) == n:
            return boxes
        hi = max(lo, hi * 0.95)
    raise RuntimeError(f"could not place {n} objects")  # not reached for n <= 16


def _background(rng: random.Random, textured: bool) -> Image.Image:
    """A light background; textured: stripes or a checker of two light colours (none of them a palette colour)."""
    base = tuple(rng.randint(215, 250) for _ in range(3))
    img = Image.new("RGB", (SIZE, SIZE), base)
    if not textured:
        return img
    other = tuple(max(190, v - rng.randint(20, 35)) for v in base)
    draw = ImageDraw.Draw(img)
    period = rng.choice((8, 12, 16, 24))
    kind = rng.choice(("hstripes", "vstripes", "checker"))
    half = period // 2
    for a in range(0, SIZE, period):
        if kind == "hstripes":
            draw.rectangle((0, a, SIZE - 1, a + half - 1), fill=other)
        elif kind == "vstripes":
            draw.rectangle((a, 0, a + half - 1, SIZE - 1), fill=other)
        else:
            for b in range(0, SIZE, half):
                if (a // half + b // half) % 2:
                    draw.rectangle((a, b, a + half - 1, b + half - 1), fill=other)
                if (a // half + 1 + b // half) % 2:
                    draw.rectangle((a + half, b, a + period - 1, b + half - 1), fill=other)
    return img


def _draw(draw: ImageDraw.ImageDraw, rng: random.Random, shape: str, colour: str, x: int, y: int, s: int) -> Obj:
    rgb = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((x, y, x + s - 1, y + s - 1), fill=rgb)
        core = (x + s // 2, y + s // 2)
    elif shape == "rectangle":
        h = int(s * rng.uniform(0.6, 1.0))  # not always a square
        top = y + (s - h) // 2
        draw.rectangle((x, top, x + s - 1, top + h - 1), fill=rgb)
        core = (x + s // 2, top + h // 2)
    else:  # triangle, one corner pointing up, down, left or right
        d = rng.randrange(4)
        m = (s - 1) / 2
        pts = [(x + m, y), (x + s - 1, y + s - 1), (x, y + s - 1)]
        c = (x + m, y + m)
        for _ in range(d):  # rotate by 90 degrees about the square's centre (the square maps onto itself)
            pts = [(c[0] - (py - c[1]), c[1] + (px - c[0])) for px, py in pts]
        draw.polygon(pts, fill=rgb)
        cx, cy = sum(p[0] for p in pts) / 3, sum(p[1] for p in pts) / 3
        core = (int(round(cx)), int(round(cy)))
    return Obj(shape, colour, (x, y, x + s, y + s), core)


# ------------------------------------------------------------------------------------------------ questions
def _question(rng: random.Random, qtype: str, colour: str, shape: str) -> str:
    if qtype == "color":
        return rng.choice((f"what color is the {shape}?", f"what is the color of the {shape}?"))
    if qtype == "shape":
        return rng.choice((f"what shape is the {colour} object?", f"what is the {colour} shape?"))
    return rng.choice((f"is there a {colour} {shape}?", f"does the image contain a {colour} {shape}?"))


def supported_questions(objects: list[Obj]) -> list[tuple[str, str, str, str, int | None]]:
    """Every (qtype, answer, colour, shape, target) the scene answers unambiguously."""
    out: list[tuple[str, str, str, str, int | None]] = []
    for i, o in enumerate(objects):
        if sum(p.shape == o.shape for p in objects) == 1:
            out.append(("color", o.colour, o.colour, o.shape, i))
        if sum(p.colour == o.colour for p in objects) == 1:
            out.append(("shape", o.shape, o.colour, o.shape, i))
    for s in SHAPES:
        for c in COLOURS:
            hits = [i for i, o in enumerate(objects) if (o.shape, o.colour) == (s, c)]
            if len(hits) == 1:
                out.append(("exists", "yes", c, s, hits[0]))
            elif not hits:
                out.append(("exists", "no", c, s, None))
    return out


def _extra_questions(rng: random.Random, objects: list[Obj], first: QA, k: int) -> list[QA]:
    """Up to ``k`` more questions on the same scene: a question kind drawn with weights 8 : 3 : 1 : 1 (colour,
    shape, yes, no: the shares of a uniform answer) among the kinds the scene still supports, then a random
    question of that kind; at most one "yes" and one "no". (Colour questions need a shape that occurs once: rare
    in busy scenes.)"""
    pool = [q for q in supported_questions(objects) if (q[2], q[3], q[0]) != (first.colour, first.shape, first.qtype)]
    extra: list[QA] = []
    weights = {"color": 8, "shape": 3, "yes": 1, "no": 1}
    while pool and len(extra) < k:
        kinds = [t for t in weights if any(_kind(q) == t for q in pool)]
        kind = rng.choices(kinds, [weights[t] for t in kinds])[0]
        pick = rng.choice([q for q in pool if _kind(q) == kind])
        pool = [q for q in pool if q is not pick and (kind not in ("yes", "no") or _kind(q) != kind)]  # one each
        qtype, answer, colour, shape, target = pick
        extra.append(QA(_question(rng, qtype, colour, shape), answer, qtype, target, colour, shape))
    return extra


def _kind(q: tuple[str, str, str, str, int | None]) -> str:
    return q[1] if q[0] == "exists" else q[0]


def _qtype_of(answer: str) -> str:
    return "color" if answer in COLOURS else "shape" if answer in SHAPES else "exists"


# ------------------------------------------------------------------------------------------------ public API
def generate(seed: int, count: int, *, questions_per_image: int = 1, textured: float = 0.25) -> list[Item]:
    """``count`` images with their scenes and questions, deterministic for ``seed`` (see the module docstring).

    ``questions_per_image``: 1 for evaluation (the balanced question only); more adds questions the scene
    supports (training). ``textured``: the fraction of images with a striped or checkered background.
    """
    if count < 1 or questions_per_image < 1 or not 0.0 <= textured <= 1.0:
        raise ValueError(f"generate: count={count}, questions_per_image={questions_per_image}, textured={textured}; "
                         "expected count >= 1, questions_per_image >= 1 and 0 <= textured <= 1")
    rng = random.Random(f"complexity-vqa-{seed}")
    cells = [(lvl, a) for lvl in range(len(LEVELS)) for a in ANSWERS]
    items: list[Item] = []
    block: list[tuple[int, str]] = []
    for index in range(count):
        if not block:
            block = rng.sample(cells, len(cells))
        level, answer = block.pop()
        n = rng.randint(*LEVELS[level])
        qtype = _qtype_of(answer)
        specs, target, colour, shape = _scene_specs(rng, n, qtype, answer)
        is_textured = rng.random() < textured
        image = _background(rng, is_textured)
        draw = ImageDraw.Draw(image)
        objects = [_draw(draw, rng, s, c, x, y, size) for (s, c), (x, y, size) in zip(specs, _layout(rng, n), strict=True)]
        first = QA(_question(rng, qtype, colour, shape), answer, qtype, target, colour, shape)
        questions = [first, *_extra_questions(rng, objects, first, questions_per_image - 1)]
        items.append(Item(index, level, "textured" if is_textured else "flat", objects, questions, image))
    return items


def records(items: list[Item], image_dir: str = "images") -> list[dict[str, Any]]:
    """``dymu eval``'s records (one per question): ``image`` (relative path), ``question``, ``answer``, plus
    ``level``, ``objects`` (count), ``qtype``, ``background`` and ``item`` (the image's index)."""
    return [
        {"image": f"{image_dir}/{it.index:06d}.png", "question": qa.question, "answer": qa.answer, "level": it.level,
         "objects": len(it.objects), "qtype": qa.qtype, "background": it.background, "item": it.index}
        for it in items
        for qa in it.questions
    ]


def write(items: list[Item], folder: str | Path, name: str = "questions.json") -> Path:
    """Write ``images/NNNNNN.png``, ``name`` (:func:`records`) and ``scenes.json`` (every object and question)
    into ``folder``; returns the questions file's path."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for it in items:
        it.image.save(folder / "images" / f"{it.index:06d}.png")
    scenes = [{"item": it.index, "level": it.level, "background": it.background,
               "objects": [asdict(o) for o in it.objects], "questions": [asdict(q) for q in it.questions]}
              for it in items]
    (folder / "scenes.json").write_text(json.dumps(scenes) + "\n")
    path = folder / name
    path.write_text(json.dumps(records(items), indent=1) + "\n")
    return path
