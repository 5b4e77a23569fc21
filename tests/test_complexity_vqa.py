"""The complexity VQA generator (dymu.complexity_vqa): deterministic per seed, balanced answers and levels, every
question answerable from its scene (checked against the scene description and the pixels), no answer readable from
the question text beyond its type, and ``dymu complexity-vqa`` writes ``dymu eval``'s format. A few seconds."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from dymu import complexity_vqa as cv

BLOCK = len(cv.LEVELS) * len(cv.ANSWERS)  # 52


@pytest.fixture(scope="module")
def items():
    return cv.generate(7, 4 * BLOCK, questions_per_image=4, textured=0.5)


def _png(item) -> bytes:
    buf = io.BytesIO()
    item.image.save(buf, format="PNG")
    return buf.getvalue()


def test_deterministic_per_seed_and_seeds_differ():
    a, b, c = cv.generate(3, 40), cv.generate(3, 40), cv.generate(4, 40)
    assert cv.records(a) == cv.records(b) and [_png(x) for x in a] == [_png(x) for x in b]
    assert [o for x in a for o in x.objects] == [o for x in b for o in x.objects]
    assert cv.records(a) != cv.records(c)
    assert sum(_png(x) == _png(y) for x, y in zip(a, c)) == 0


def test_answers_and_levels_balanced(items):
    first = [(it.level, it.questions[0].answer) for it in items]
    # every block of 52 images holds each (level, answer) pair once: 4 blocks -> 4 each
    assert Counter(first) == {(lvl, a): 4 for lvl in range(len(cv.LEVELS)) for a in cv.ANSWERS}
    for it in items:
        lo, hi = cv.LEVELS[it.level]
        assert lo <= len(it.objects) <= hi
    counts = Counter(len(it.objects) for it in items)
    assert min(counts) == 1 and max(counts) >= 12  # 1 to >= 12 objects
    assert Counter(it.background for it in items)["textured"] > 0.3 * len(items)
    # the extra (training) questions: every answer occurs, none dominates
    extra = Counter(q.answer for it in items for q in it.questions[1:])
    assert set(extra) == set(cv.ANSWERS) and max(extra.values()) < 0.3 * sum(extra.values())


def test_questions_answerable_from_the_scene(items):
    for it in items:
        objs = it.objects
        for qa in it.questions:
            assert qa.answer in cv.ANSWERS
            assert qa.shape in qa.question if qa.qtype != "shape" else qa.colour in qa.question
            if qa.qtype == "color":  # the shape asked about is in the scene exactly once, and has that colour
                hits = [i for i, o in enumerate(objs) if o.shape == qa.shape]
                assert hits == [qa.target] and objs[qa.target].colour == qa.answer, (it.index, qa)
            elif qa.qtype == "shape":  # the colour asked about is in the scene exactly once
                hits = [i for i, o in enumerate(objs) if o.colour == qa.colour]
                assert hits == [qa.target] and objs[qa.target].shape == qa.answer, (it.index, qa)
            else:
                hits = [i for i, o in enumerate(objs) if (o.shape, o.colour) == (qa.shape, qa.colour)]
                assert hits == ([qa.target] if qa.answer == "yes" else []), (it.index, qa)


def test_hard_negatives(items):
    """A balanced "no" in a scene of >= 2 objects: the colour and the shape it names are there, on other objects."""
    checked = 0
    for it in items:
        qa = it.questions[0]
        if qa.answer == "no" and len(it.objects) >= 2:
            assert any(o.colour == qa.colour for o in it.objects) and any(o.shape == qa.shape for o in it.objects)
            checked += 1
    assert checked >= 8


def test_pixels_match_the_scene(items):
    palette = {tuple(v): k for k, v in cv.COLOURS.items()}
    for it in items[:120]:
        px = np.asarray(it.image)
        assert px.shape == (cv.SIZE, cv.SIZE, 3)
        for o in it.objects:
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= cv.SIZE and 0 <= y0 < y1 <= cv.SIZE and x1 - x0 >= cv.MIN_SIZE
            assert tuple(px[o.core[1], o.core[0]]) == cv.COLOURS[o.colour], (it.index, o)
        # no two boxes overlap
        for i, a in enumerate(it.objects):
            for b in it.objects[i + 1 :]:
                assert a.box[2] <= b.box[0] or b.box[2] <= a.box[0] or a.box[3] <= b.box[1] or b.box[3] <= a.box[1]
        # each palette colour's pixels lie inside the boxes of the objects of that colour (background: none)
        for rgb, name in palette.items():
            ys, xs = np.nonzero((px == np.array(rgb)).all(-1))
            boxes = [o.box for o in it.objects if o.colour == name]
            inside = np.zeros(len(xs), bool)
            for x0, y0, x1, y1 in boxes:
                inside |= (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
            assert inside.all(), (it.index, name)
            assert (len(xs) > 0) == bool(boxes)


def test_question_text_alone_gives_only_the_question_type():
    """The best text-only guesser (the majority answer of each exact question string on one seed) scores on another
    seed no better than knowing the question type: 1/8 (colour), 1/3 (shape), 1/2 (yes/no) -> 3/13 overall."""
    fit, held = cv.generate(11, 8 * BLOCK), cv.generate(12, 8 * BLOCK)
    votes: dict[str, Counter] = defaultdict(Counter)
    for it in fit:
        votes[it.questions[0].question][it.questions[0].answer] += 1
    right = sum(votes[it.questions[0].question].most_common(1)[0][0] == it.questions[0].answer
                for it in held if it.questions[0].question in votes)
    assert right / len(held) < 3 / 13 + 0.06, right / len(held)


def test_bad_arguments():
    with pytest.raises(ValueError, match="expected count >= 1"):
        cv.generate(0, 0)
    with pytest.raises(ValueError, match="textured"):
        cv.generate(0, 5, textured=1.5)


def test_cli_writes_dymu_eval_format(tmp_path):
    from dymu.evaluation import read_questions

    out = tmp_path / "set"
    run = subprocess.run([sys.executable, "-m", "dymu", "complexity-vqa", "--seed", "5", "--count", "30", "--out",
                          str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    questions, image_dir = read_questions(out / "questions.json")
    assert len(questions) == 30 and all((image_dir / q.image).is_file() for q in questions)
    rows = json.loads((out / "questions.json").read_text())
    assert rows == cv.records(cv.generate(5, 30))
    scenes = json.loads((out / "scenes.json").read_text())
    assert [len(s["objects"]) for s in scenes] == [r["objects"] for r in rows]


def test_training_pool_of_train_projector(tmp_path):
    """``dymu train-projector --mix``: the generated images join the pool under their own ids, written once; the
    mix settings are part of the run's settings (a resume with other ones is refused) and absent without --mix."""
    import argparse

    from dymu.commands import train_projector as tp

    qa, paths = tp.complexity_vqa_by_image(9, 12, 3, tmp_path)
    items = cv.generate(9, 12, questions_per_image=3)
    assert sorted(qa) == [tp.MIX_ID_OFFSET + i for i in range(12)]
    assert [qa[tp.MIX_ID_OFFSET + it.index] for it in items] == [[(q.question, q.answer) for q in it.questions]
                                                                   for it in items]
    assert all(Path(p).is_file() for p in paths.values())
    stamp = (tmp_path / "complexity-vqa-seed9-12x3" / "questions.json").stat().st_mtime_ns
    assert tp.complexity_vqa_by_image(9, 12, 3, tmp_path) == (qa, paths)
    assert (tmp_path / "complexity-vqa-seed9-12x3" / "questions.json").stat().st_mtime_ns == stamp  # not rewritten
    parser = argparse.ArgumentParser()
    tp.add_arguments(parser)
    plain = tp.settings_of(tp.config_from_args(parser.parse_args([])))
    mixed = tp.settings_of(tp.config_from_args(parser.parse_args(["--mix", "12", "--mix-seed", "9", "--init",
                                                                  "x.safetensors"])))
    assert "mix" not in plain and "init" not in plain
    assert {k: mixed[k] for k in ("mix", "mix_seed", "mix_questions", "init")} == {
        "mix": 12, "mix_seed": 9, "mix_questions": 8, "init": "x.safetensors"}
