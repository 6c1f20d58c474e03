"""The synthetic scenes: determinism, cache, annotations that agree with pixels and with each
other, answers re-derived independently from the COCO file, vocabulary, blind baseline."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distiq.config import ConfigError, from_dict
from distiq.data import _generate, generate_scenes_at, scenes
from distiq.data._render import COLOUR_RGB, SHAPE_PLURALS
from distiq.data.scenes import (
    SceneConfig,
    blind_baseline_accuracy,
    blind_baseline_by_type,
    generate_scenes,
    vocabulary,
)


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "meta.json"
    }


def test_deterministic_by_seed_whatever_the_workers(tmp_path, monkeypatch):
    monkeypatch.setattr(_generate, "CHUNK_SIZE", 6)  # several chunks per split
    one = generate_scenes(tmp_path / "a", count=30, seed=5, workers=1)
    two = generate_scenes(tmp_path / "b", count=30, seed=5, workers=2)
    other = generate_scenes(tmp_path / "c", count=30, seed=6, workers=1)
    assert one.root.name == two.root.name
    digest_one = _tree_digest(one.root)
    assert len(digest_one) == 30 * 4 + 3 * 3 + 2  # 4 PNGs a scene, 3 JSON a split, 2 label maps
    assert digest_one == _tree_digest(two.root)
    assert digest_one != _tree_digest(other.root)
    meta = json.loads(one.meta.read_text())
    assert {s: meta["splits"][s]["images"] for s in scenes.SPLITS} == {
        "train": 24,
        "val": 3,
        "test": 3,
    }


def test_cache_reuses_a_complete_set(tmp_path, monkeypatch):
    first = generate_scenes(tmp_path, count=8, seed=1, workers=1)

    def fail(task):
        raise AssertionError("the cached set should have been reused")

    monkeypatch.setattr(_generate, "render_chunk", fail)
    again = generate_scenes(tmp_path, count=8, seed=1, workers=1)
    assert again.root == first.root
    with pytest.raises(AssertionError, match="reused"):  # another key is generated afresh
        generate_scenes(tmp_path, count=8, seed=1, image_size=48, workers=1)
    assert not list(tmp_path.glob(".*tmp*"))  # the failed run left no temporary folder


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"count": 0}, "count"),
        ({"count": 5, "image_size": 16}, "image_size"),
        ({"count": 5, "split_fractions": (0.5, 0.2, 0.2)}, "split_fractions"),
        ({"count": 5, "workers": 0}, "workers"),
    ],
)
def test_generate_rejects_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_scenes(tmp_path, **kwargs)


def test_scene_config_checks_and_suggests():
    with pytest.raises(ConfigError, match=r"'gren' is unknown \(did you mean 'green'"):
        SceneConfig(colours=("red", "gren"))
    with pytest.raises(ConfigError, match="min_objects"):
        SceneConfig(min_objects=4, max_objects=2)
    config = from_dict(SceneConfig, {"colours": ["red", "blue"], "digits": [3], "max_objects": 4})
    assert config.categories == ("circle", "square", "triangle", "3")
    assert config.nouns == ("circle", "square", "triangle", "digit")


def _objects_by_image(instances: dict) -> dict[int, list[dict]]:
    kind = {c["id"]: (c["name"], c["supercategory"]) for c in instances["categories"]}
    out: dict[int, list[dict]] = {im["id"]: [] for im in instances["images"]}
    for ann in instances["annotations"]:
        name, supercategory = kind[ann["category_id"]]
        x, y, w, h = ann["bbox"]
        out[ann["image_id"]].append(
            {
                "category": name,
                "noun": name if supercategory == "shape" else "digit",
                "colour": ann["color"],
                "cx": x + w / 2,
                "cy": y + h / 2,
            }
        )
    return out


def _oracle(question: str, objects: list[dict], size: int, margin: float) -> str:
    """The answer to ``question`` derived from the COCO objects alone (independent of the
    generator's question code)."""
    plural_to_noun = {v: k for k, v in SHAPE_PLURALS.items()}
    count = lambda pred: sum(1 for o in objects if pred(o))  # noqa: E731

    def unique(pred) -> dict:
        found = [o for o in objects if pred(o)]
        assert len(found) == 1, (question, found)
        return found[0]

    if question == "how many objects are there?":
        return str(len(objects))
    if m := re.fullmatch(r"how many (\w+) objects are there\?", question):
        return str(count(lambda o: o["colour"] == m[1]))
    if m := re.fullmatch(r"how many (\w+) are there\?", question):
        return str(count(lambda o: o["noun"] == plural_to_noun[m[1]]))
    if m := re.fullmatch(r"what color is the (\w+)\?", question):
        return unique(lambda o: o["noun"] == m[1])["colour"]
    if m := re.fullmatch(r"what (shape|digit) is the (\w+) object\?", question):
        found = unique(lambda o: o["colour"] == m[2])
        assert (found["noun"] == "digit") == (m[1] == "digit")
        return found["category"]
    if m := re.fullmatch(
        r"is the (\w+) (\w+) (on the left or the right|at the top or the bottom)\?", question
    ):
        o = unique(lambda o: (o["colour"], o["noun"]) == (m[1], m[2]))
        axis = "cx" if "left" in m[3] else "cy"
        assert abs(o[axis] - size / 2) >= margin
        return (
            ("left" if o["cx"] < size / 2 else "right")
            if axis == "cx"
            else ("top" if o["cy"] < size / 2 else "bottom")
        )
    if m := re.fullmatch(r"is the (\w+) (\w+) to the (left|right) of the (\w+) (\w+)\?", question):
        a = unique(lambda o: (o["colour"], o["noun"]) == (m[1], m[2]))
        b = unique(lambda o: (o["colour"], o["noun"]) == (m[4], m[5]))
        assert abs(a["cx"] - b["cx"]) >= margin
        return "yes" if (a["cx"] < b["cx"]) == (m[3] == "left") else "no"
    if m := re.fullmatch(r"is there a (\w+) (\w+)\?", question):
        return "yes" if count(lambda o: (o["colour"], o["noun"]) == (m[1], m[2])) else "no"
    if m := re.fullmatch(r"are there more (\w+) objects than (\w+) objects\?", question):
        return (
            "yes"
            if count(lambda o: o["colour"] == m[1]) > count(lambda o: o["colour"] == m[2])
            else "no"
        )
    if m := re.fullmatch(r"are there more (\w+) than (\w+)\?", question):
        n1, n2 = plural_to_noun[m[1]], plural_to_noun[m[2]]
        return (
            "yes" if count(lambda o: o["noun"] == n1) > count(lambda o: o["noun"] == n2) else "no"
        )
    raise AssertionError(f"unexpected question {question!r}")


def test_answers_follow_from_the_annotations(scene_set):
    meta = scene_set.read_meta()
    size, margin = meta["image_size"], meta["config"]["position_margin"] * meta["image_size"]
    seen_types = Counter()
    for split in scenes.SPLITS:
        paths = scene_set[split]
        objects = _objects_by_image(json.loads(paths.instances.read_text()))
        questions = json.loads(paths.questions.read_text())
        annotations = json.loads(paths.annotations.read_text())
        assert questions["data_subtype"] == annotations["data_subtype"] == split
        by_id = {a["question_id"]: a for a in annotations["annotations"]}
        for q in questions["questions"]:
            a = by_id[q["question_id"]]
            assert len(a["answers"]) == 10 and [x["answer_id"] for x in a["answers"]] == list(
                range(1, 11)
            )
            assert {x["answer"] for x in a["answers"]} == {a["multiple_choice_answer"]}
            assert a["multiple_choice_answer"] == _oracle(
                q["question"], objects[q["image_id"]], size, margin
            )
            assert a["answer_type"] == {
                "count": "number",
                "relation": "yes/no",
                "exist": "yes/no",
                "compare": "yes/no",
            }.get(a["question_type"], "other")
            seen_types[a["question_type"]] += 1
    assert set(seen_types) == set(scenes.QUESTION_TYPES)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_boxes_masks_and_pixels_agree(scene_set):
    from pycocotools import mask as mask_utils

    meta = scene_set.read_meta()
    colours = meta["colours"]
    n_objects = 0
    for split in scenes.SPLITS:
        paths = scene_set[split]
        instances = json.loads(paths.instances.read_text())
        anns_by_image: dict[int, list[dict]] = {}
        for ann in instances["annotations"]:
            anns_by_image.setdefault(ann["image_id"], []).append(ann)
        for entry in instances["images"]:
            image = np.asarray(Image.open(paths.images / entry["file_name"]))
            class_mask = np.asarray(Image.open(paths.masks / entry["file_name"]))
            colour_mask = np.asarray(Image.open(paths.colour_masks / entry["file_name"]))
            assert image.shape == (64, 64, 3) and class_mask.shape == colour_mask.shape == (64, 64)
            union = np.zeros((64, 64), dtype=int)
            anns = anns_by_image.get(entry["id"], [])
            assert 1 <= len(anns) <= 6
            for ann in anns:
                rle = mask_utils.frPyObjects(ann["segmentation"], 64, 64)
                instance = mask_utils.decode(rle).astype(bool)
                ys, xs = np.nonzero(instance)
                x, y, w, h = ann["bbox"]
                assert (x, y, x + w, y + h) == (
                    xs.min(),
                    ys.min(),
                    xs.max() + 1,
                    ys.max() + 1,
                )  # tight box
                assert ann["area"] == instance.sum() == mask_utils.area(rle)
                assert (class_mask[instance] == ann["category_id"]).all()
                colour_index = colours.index(ann["color"])
                assert (colour_mask[instance] == colour_index + 1).all()
                # The pixels show the declared colour: nearest palette colour of their mean.
                mean = image[instance].reshape(-1, 3).mean(axis=0)
                nearest = min(
                    colours, key=lambda c: np.sum((np.asarray(COLOUR_RGB[c]) - mean) ** 2)
                )
                assert nearest == ann["color"]
                union += instance
            assert union.max() <= 1  # instances are disjoint
            assert ((class_mask > 0) == (union == 1)).all() and (
                (colour_mask > 0) == (union == 1)
            ).all()
            # Objects of one colour never touch: their boxes are at least one pixel apart.
            for i, a in enumerate(anns):
                for b in anns[i + 1 :]:
                    if a["color"] == b["color"]:
                        ax, ay, aw, ah = a["bbox"]
                        bx, by, bw, bh = b["bbox"]
                        assert bx > ax + aw or ax > bx + bw or by > ay + ah or ay > by + bh
            n_objects += len(anns)
    assert n_objects == sum(meta["splits"][s]["objects"] for s in scenes.SPLITS)


def test_loaders_read_back_what_the_generator_wrote(scene_set):
    meta = scene_set.read_meta()
    for split in scenes.SPLITS:
        vqa = scene_set.vqa(split)
        assert len(vqa) == meta["splits"][split]["questions"] and vqa.summary.skipped == 0
        sample = vqa[0]
        assert sample["answers"] == [sample["answer"]] * 10
        assert sample["question_id"] // 1000 == sample["image_id"]
        file = scene_set[split].images / f"COCO_{split}_{sample['image_id']:012d}.png"
        assert np.array_equal(np.asarray(sample["image"]), np.asarray(Image.open(file)))

        detection = scene_set.detection(split)
        assert len(detection) == meta["splits"][split]["images"]
        assert detection.classes == tuple(meta["categories"])
        instances = json.loads(scene_set[split].instances.read_text())
        first = [
            a for a in instances["annotations"] if a["image_id"] == detection.records[0]["image_id"]
        ]
        sample = detection[0]
        expected = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in first)]
        assert sample["boxes"].tolist() == expected
        assert sample["labels"].tolist() == [a["category_id"] - 1 for a in first]

        for target, folder in (
            ("category", scene_set[split].masks),
            ("colour", scene_set[split].colour_masks),
        ):
            seg = scene_set.segmentation(split, target=target)
            assert len(seg) == meta["splits"][split]["images"]
            sample = seg[0]
            assert (
                sample["image_id"] == seg.records[0]["image_id"] == detection.records[0]["image_id"]
            )
            png = np.asarray(Image.open(folder / f"{seg.records[0]['name']}.png"))
            assert np.array_equal(sample["mask"].numpy(), png)
        assert seg.classes == ("background", *meta["colours"])


def test_vocabulary_covers_every_question_and_answer(scene_set):
    words = vocabulary()
    assert words == sorted(set(words)) and all(w == w.lower() for w in words)
    assert {"?", "yes", "no", "0", "6", "red", "circle", "digit", "4", "left", "bottom"} <= set(
        words
    )
    used = set()
    for split in scenes.SPLITS:
        for sample in scene_set.vqa(split).records:
            used |= set(scenes.split_words(sample["question"])) | {sample["answer"]}
    assert used <= set(words)
    assert scene_set.read_meta()["vocabulary"] == words


def test_blind_baseline_is_the_per_question_prior():
    train = [
        {"question": "q1", "answer": "a", "question_type": "t"},
        {"question": "q1", "answer": "a", "question_type": "t"},
        {"question": "q1", "answer": "b", "question_type": "t"},
        {"question": "q2", "answer": "c", "question_type": "u"},
        {"question": "q3", "answer": "d", "question_type": "u"},
        {"question": "q3", "answer": "c", "question_type": "u"},
    ]
    test = [
        {"question": "q1", "answer": "a", "question_type": "t"},  # prior a: right
        {"question": "q1", "answer": "b", "question_type": "t"},  # wrong
        {"question": "q3", "answer": "c", "question_type": "u"},  # tie c/d -> "c": right
        {"question": "q9", "answer": "c", "question_type": "u"},  # unseen text -> type u's "c"
        {"question": "q8", "answer": "a", "question_type": "v"},  # unseen type -> overall "a"
    ]
    assert blind_baseline_accuracy(train, test) == pytest.approx(4 / 5)
    assert blind_baseline_by_type(train, test) == {"t": 0.5, "u": 1.0, "v": 1.0}
    with pytest.raises(ValueError, match="no questions"):
        blind_baseline_accuracy([], test)


def test_answers_are_balanced_per_question_text(scene_set):
    train, test = scene_set.vqa("train"), scene_set.vqa("test")
    blind = blind_baseline_accuracy(train, test)
    recorded = scene_set.read_meta()["blind_baseline"]["accuracy"]
    assert blind == pytest.approx(recorded)
    # Yes/no questions: neither answer dominates.
    answers = Counter(r["answer"] for r in train.records if r["answer"] in ("yes", "no"))
    assert 0.35 < answers["yes"] / (answers["yes"] + answers["no"]) < 0.65


def test_generate_scenes_at_writes_the_named_folder_reuses_it_and_refuses_others(tmp_path):
    folder = tmp_path / "data" / "edge-scenes"
    made = generate_scenes_at(folder, 30, seed=2, image_size=32)
    assert made.root == folder and (folder / "meta.json").is_file()
    meta = json.loads((folder / "meta.json").read_text())
    assert (meta["count"], meta["seed"], meta["image_size"]) == (30, 2, 32)
    reference = scenes.generate_scenes(tmp_path / "ref", count=30, seed=2, image_size=32)
    assert sorted(p.name for p in folder.glob("*/images/*.png")) == sorted(
        p.name for p in reference.root.glob("*/images/*.png")
    )  # the same set generate_scenes writes
    stamp = (folder / "meta.json").stat().st_mtime_ns
    generate_scenes_at(folder, 30, seed=2, image_size=32)  # reused, not rewritten
    assert (folder / "meta.json").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="another scene set"):
        generate_scenes_at(folder, 40, seed=2, image_size=32)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a scene set"):
        generate_scenes_at(mine, 30)
    assert (mine / "notes.txt").read_text() == "keep me"
    assert not list(tmp_path.glob("data/.*staging*"))
