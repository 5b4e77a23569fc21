"""`dymu thresholds` and `dymu encode` on a tiny saved Qwen2-VL checkpoint folder (in-process main())."""

from __future__ import annotations

import json

import pytest

from dymu import vlm
from dymu.cli import main
from dymu.samples import make_image
from dymu.testing import save_tiny_qwen_vlm


def write_list(folder, kinds, seed):
    folder.mkdir()
    for i, kind in enumerate(kinds):
        make_image(kind, 64, seed=seed + i).save(folder / f"{i}.png")
    (folder / "list.json").write_text(json.dumps([{"image": f"{i}.png"} for i in range(len(kinds))]))
    return folder / "list.json"


@pytest.fixture(scope="module")
def found(tmp_path_factory):
    """Thresholds found by the CLI on one image list (Qwen2-VL, 2 blocks, 56 px = 4 cells, keep 50%)."""
    root = tmp_path_factory.mktemp("qwen_cli")
    folder = save_tiny_qwen_vlm(root / "qwen2_vl", "qwen2_vl")
    data = write_list(root / "find", ["textured", "stripes", "gradient", "flat"] * 2, seed=0)
    out = root / "qwen2_vl-p14-d32-l2-tome-50pct.safetensors"
    assert main(["thresholds", "--model", str(folder), "--data", str(data), "--keep-percent", "50",
                 "--image-size", "56", "--batch-size", "4", "--num-workers", "0", "--quiet", "--output", str(out)]) == 0
    return folder, out, root


def test_found_thresholds_load_and_follow_content(found, capsys):
    """The written checkpoint loads with load_qwen; a flat image from another list keeps fewer visual tokens than
    a textured one, and `dymu encode` prints the same per-image counts."""
    folder, out, root = found
    other = root / "other"
    other.mkdir()
    flat, textured = other / "flat.png", other / "textured.png"
    make_image("flat", 90, seed=100).save(flat)
    make_image("textured", 90, seed=101).save(textured)
    model, processor = vlm.load_qwen(folder, thresholds=out)
    answers = vlm.answer(model, processor, [make_image("flat", 90, seed=100), make_image("textured", 90, seed=101)],
                         ["w1", "w2"], max_new_tokens=1)
    assert answers[0].visual_tokens < answers[1].visual_tokens
    capsys.readouterr()
    assert main(["encode", "--model", str(folder), "--thresholds", str(out), "--json", str(flat), str(textured)]) == 0
    printed = json.loads(capsys.readouterr().out)["images"]
    assert [i["tokens"] for i in printed] == [a.visual_tokens for a in answers]
    assert printed[0]["tokens"] < printed[1]["tokens"] <= printed[1]["stock_tokens"]


def test_qwen_budget_flags_are_checked(found, tmp_path, capsys):
    folder, _, root = found
    data = str(root / "find" / "list.json")
    assert main(["thresholds", "--model", str(folder), "--data", data, "--out-tokens", "2"]) != 0
    assert "--keep-percent" in capsys.readouterr().err
    assert main(["thresholds", "--model", str(folder), "--data", data, "--keep-percent", "50", "--image-size", "50",
                 "--output", str(tmp_path / "x.safetensors")]) != 0
    assert "multiple of 28" in capsys.readouterr().err
    image = tmp_path / "flat.png"
    make_image("flat", 56, seed=7).save(image)
    assert main(["encode", "--model", str(folder), "--thresholds", str(found[1]), "--layer", "-2", str(image)]) != 0
    assert "--layer is not supported" in capsys.readouterr().err
    from dymu.encoders.names import parse_dymu_name

    with pytest.raises(ValueError, match="Qwen-VL tower thresholds"):
        parse_dymu_name("qwen2_vl-p14-d32-l2-tome-50pct")
