"""VQA v2 and Visual Genome loaders on fixture files in the real formats, every bad record in
both modes."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from distiq.data import BadRecordError, load_visual_genome_qa, load_vqa_v2
from distiq.data.formats import vqa_annotation
from distiq.data.vqa import canonical_answer


def _vqa_fixture(root, files):
    """Two COCO-named images, three questions; the third has a split human vote."""
    images = root / "val2014"
    for image_id in (42, 73):
        files.write_image(images / f"COCO_val2014_{image_id:012d}.jpg", seed=image_id)
    questions = [
        {"image_id": 42, "question": "What color is the bus?", "question_id": 42000},
        {"image_id": 42, "question": "Is it raining?", "question_id": 42001},
        {"image_id": 73, "question": "How many dogs are there?", "question_id": 73000},
    ]
    annotations = [
        vqa_annotation(
            42000,
            42,
            ["red"] * 9 + ["maroon"],
            question_type="what color is the",
            answer_type="other",
        ),
        vqa_annotation(
            42001, 42, ["no"] * 6 + ["yes"] * 4, question_type="is it", answer_type="yes/no"
        ),
        vqa_annotation(
            73000,
            73,
            ["2"] * 4 + ["3"] * 4 + ["two"] * 2,
            question_type="how many",
            answer_type="number",
        ),
    ]
    annotations[2]["multiple_choice_answer"] = "3"  # VQA's pick among the tied answers
    q_doc = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {},
             "data_subtype": "val2014", "questions": questions}  # fmt: skip
    a_doc = {
        "info": {},
        "license": {},
        "data_type": "mscoco",
        "data_subtype": "val2014",
        "annotations": annotations,
    }
    return root / "q.json", root / "a.json", images, q_doc, a_doc


def _write(path, doc):
    path.write_text(json.dumps(doc))


def test_vqa_v2_reads_the_official_layout(tmp_path, files):
    q_path, a_path, images, q_doc, a_doc = _vqa_fixture(tmp_path, files)
    _write(q_path, q_doc)
    _write(a_path, a_doc)
    dataset = load_vqa_v2(q_path, a_path, images)
    assert len(dataset) == 3 and dataset.summary.skipped == 0 and dataset.summary.loaded == 3
    sample = dataset[0]
    assert set(sample) == {
        "image",
        "question",
        "answers",
        "answer",
        "question_type",
        "question_id",
        "image_id",
    }
    assert sample["image"].mode == "RGB" and sample["image"].size == (16, 12)
    assert sample["answers"] == ["red"] * 9 + ["maroon"] and sample["answer"] == "red"
    assert sample["question_type"] == "what color is the" and sample["image_id"] == 42
    assert dataset[1]["answer"] == "no"
    assert dataset[2]["answer"] == "3"  # tie between "2" and "3": multiple_choice_answer wins
    # test-dev style: no annotations
    bare = load_vqa_v2(q_path, None, images)
    assert bare[0]["answers"] == [] and bare[0]["answer"] == ""
    # COCO 2017-style names and a custom pattern
    shutil.move(images / "COCO_val2014_000000000042.jpg", images / "000000000042.jpg")
    assert load_vqa_v2(q_path, a_path, images).records[0]["image_path"].endswith("000000000042.jpg")
    renamed = load_vqa_v2(q_path, a_path, tmp_path, image_name="val2014/{image_id:012d}.jpg", check_images=False,
                          on_bad_record="skip")  # fmt: skip
    assert [r["image_id"] for r in renamed.records] == [42, 42]


def test_canonical_answer_ties():
    assert canonical_answer(["a", "b", "b", "a"]) == "a"  # first given
    assert canonical_answer(["a", "b", "b", "a"], preferred="b") == "b"
    assert canonical_answer(["a", "b", "b"], preferred="a") == "b"  # not tied: frequency wins


def _break_image(q_doc, a_doc, images, files):
    files.corrupt(images / "COCO_val2014_000000000073.jpg")


def _truncate_image(q_doc, a_doc, images, files):
    files.corrupt(images / "COCO_val2014_000000000073.jpg", how="truncate")


def _remove_image(q_doc, a_doc, images, files):
    (images / "COCO_val2014_000000000073.jpg").unlink()


def _malform_annotation(q_doc, a_doc, images, files):
    a_doc["annotations"][2]["answers"] = "3"


def _drop_annotation(q_doc, a_doc, images, files):
    del a_doc["annotations"][2]


def _malform_question(q_doc, a_doc, images, files):
    q_doc["questions"][2] = {"question": 7, "image_id": 73, "question_id": 73000}


VQA_CASES = [
    (_break_image, "corrupt image", "COCO_val2014_000000000073.jpg"),
    (_truncate_image, "corrupt image", "COCO_val2014_000000000073.jpg"),
    (_remove_image, "missing image", "COCO_val2014_000000000073.jpg"),
    (_malform_annotation, "malformed", "a.json"),
    (_drop_annotation, "missing annotation", "a.json"),
    (_malform_question, "malformed", "q.json"),
]


@pytest.mark.parametrize("mutate, reason, file", VQA_CASES, ids=[c[0].__name__ for c in VQA_CASES])
def test_vqa_v2_bad_records_in_both_modes(tmp_path, files, caplog, mutate, reason, file):
    q_path, a_path, images, q_doc, a_doc = _vqa_fixture(tmp_path, files)
    mutate(q_doc, a_doc, images, files)
    _write(q_path, q_doc)
    _write(a_path, a_doc)
    with pytest.raises(BadRecordError) as info:
        load_vqa_v2(q_path, a_path, images)
    assert info.value.reason == reason and info.value.file.endswith(file)
    assert file in str(info.value) and "on_bad_record='skip'" in str(info.value)
    assert "73000" in info.value.record or "#2" in info.value.record  # names the record
    with caplog.at_level(logging.WARNING, logger="distiq.data.records"):
        dataset = load_vqa_v2(q_path, a_path, images, on_bad_record="skip")
    assert [r["question_id"] for r in dataset.records] == [42000, 42001]
    assert dataset.summary.skipped == 1 and dataset.summary.by_reason == {reason: 1}
    assert "1 skipped" in caplog.text and reason in caplog.text


def test_vqa_v2_missing_image_found_without_decoding(tmp_path, files):
    """check_images=False looks images up in one listing of the folder: a missing file is
    still a bad record, under the default names and a custom pattern with a subfolder."""
    q_path, a_path, images, q_doc, a_doc = _vqa_fixture(tmp_path, files)
    _write(q_path, q_doc)
    _write(a_path, a_doc)
    _remove_image(q_doc, a_doc, images, files)
    with pytest.raises(BadRecordError) as info:
        load_vqa_v2(q_path, a_path, images, check_images=False)
    assert info.value.reason == "missing image" and "000000000073" in str(info.value)
    kept = load_vqa_v2(q_path, a_path, images, check_images=False, on_bad_record="skip")
    assert [r["question_id"] for r in kept.records] == [42000, 42001]
    pattern = images.name + "/COCO_val2014_{image_id:012d}.jpg"
    nested = load_vqa_v2(q_path, a_path, tmp_path, image_name=pattern, check_images=False,
                         on_bad_record="skip")  # fmt: skip
    assert [r["image_id"] for r in nested.records] == [42, 42]
    assert nested.summary.by_reason == {"missing image": 1}


def test_vqa_v2_rejects_files_that_are_not_vqa(tmp_path, files):
    q_path, a_path, images, q_doc, _ = _vqa_fixture(tmp_path, files)
    _write(q_path, {"annotations": []})
    with pytest.raises(ValueError, match="not a VQA v2 questions file"):
        load_vqa_v2(q_path, a_path, images)
    q_path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_vqa_v2(q_path, a_path, images)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vqa_v2(tmp_path / "nope.json", a_path, images)
    _write(q_path, q_doc)
    with pytest.raises(ValueError, match="on_bad_record='ignore' is not supported"):
        load_vqa_v2(q_path, None, images, on_bad_record="ignore")


def test_vqa_v2_repeated_question_id_in_the_questions_file(tmp_path, files):
    q_path, a_path, images, q_doc, a_doc = _vqa_fixture(tmp_path, files)
    # a second question with 42000's id would be trained on 42000's answers
    q_doc["questions"].append({"image_id": 73, "question": "Is it a cat?", "question_id": 42000})
    _write(q_path, q_doc)
    _write(a_path, a_doc)
    with pytest.raises(BadRecordError) as info:
        load_vqa_v2(q_path, a_path, images)
    error = info.value
    assert error.file == str(q_path) and error.reason == "malformed"
    assert error.record == "question #0"
    assert "question_id 42000 is used by 2 questions (#0, #3)" in str(error)
    assert "must be unique" in str(error) and "data.on_bad_record: skip" in str(error)
    dataset = load_vqa_v2(q_path, a_path, images, on_bad_record="skip")
    assert [r["question_id"] for r in dataset.records] == [42001, 73000]  # both 42000s go
    assert dataset.summary.by_reason == {"malformed": 2}


def test_vqa_v2_repeated_question_id_in_the_annotations_file(tmp_path, files):
    q_path, a_path, images, q_doc, a_doc = _vqa_fixture(tmp_path, files)
    a_doc["annotations"].append(
        vqa_annotation(42000, 42, ["blue"] * 10, question_type="what color", answer_type="other")
    )
    _write(q_path, q_doc)
    _write(a_path, a_doc)
    with pytest.raises(BadRecordError) as info:
        load_vqa_v2(q_path, a_path, images)
    error = info.value
    assert error.file == str(a_path) and error.record == "question_id 42000"
    assert "question_id 42000 is used by 2 annotations (#0, #3)" in str(error)
    assert "keep one annotation per question" in str(error)
    dataset = load_vqa_v2(q_path, a_path, images, on_bad_record="skip")
    assert [r["question_id"] for r in dataset.records] == [42001, 73000]
    assert dataset.summary.by_reason == {"malformed": 1}


@pytest.mark.parametrize("which", ["questions", "annotations"])
def test_vqa_v2_non_utf8_files_name_the_file(tmp_path, files, which):
    q_path, a_path, images, q_doc, a_doc = _vqa_fixture(tmp_path, files)
    q_doc["questions"][0]["question"] = "What colour is the café's bus?"
    a_doc["annotations"][0]["answers"][0]["answer"] = "rouge foncé"
    for path, doc in ((q_path, q_doc), (a_path, a_doc)):
        path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    assert load_vqa_v2(q_path, a_path, images)[0]["question"].endswith("café's bus?")
    broken = q_path if which == "questions" else a_path
    doc = q_doc if which == "questions" else a_doc
    broken.write_bytes(json.dumps(doc, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(ValueError) as info:
        load_vqa_v2(q_path, a_path, images)
    text = str(info.value)
    assert text.startswith(f"{broken}: not UTF-8 text (byte 0xe9")
    assert f"a VQA v2 {which} file must be UTF-8" in text
    # a byte-order mark is fine
    broken.write_bytes(b"\xef\xbb\xbf" + json.dumps(doc).encode())
    assert len(load_vqa_v2(q_path, a_path, images)) == 3


def test_vqa_v2_image_above_the_pixel_limit_is_a_bad_record(tmp_path, files, monkeypatch):
    from distiq.data import records

    q_path, a_path, images, q_doc, a_doc = _vqa_fixture(tmp_path, files)
    _write(q_path, q_doc)
    _write(a_path, a_doc)
    monkeypatch.setattr(records, "MAX_IMAGE_PIXELS", 100)  # the fixture images are 16×12
    with pytest.raises(BadRecordError) as info:
        load_vqa_v2(q_path, a_path, images)
    assert info.value.reason == "image too large" and "limit of 100 pixels" in str(info.value)
    lazily = load_vqa_v2(q_path, a_path, images, check_images=False)  # checked when read
    with pytest.raises(BadRecordError, match="image too large"):
        lazily[0]


def _vg_fixture(root, files):
    for folder, image_id in (("VG_100K", 1), ("VG_100K_2", 2)):
        files.write_image(root / folder / f"{image_id}.jpg", seed=image_id)
    image_data = [
        {"image_id": 1, "url": "https://cs.stanford.edu/people/rak248/VG_100K/1.jpg", "width": 16, "height": 12,
         "coco_id": None, "flickr_id": None},
        {"id": 2, "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/2.jpg", "width": 16, "height": 12,
         "coco_id": 5, "flickr_id": None},
    ]  # fmt: skip
    qas = [
        {"id": 1, "qas": [
            {"qa_id": 10, "image_id": 1, "question": "What color is the clock?", "answer": "Green.",
             "a_objects": [], "q_objects": []},
            {"qa_id": 11, "image_id": 1, "question": "Where is the man?", "answer": "On the street.",
             "a_objects": [], "q_objects": []},
        ]},
        {"id": 2, "qas": [{"qa_id": 20, "image_id": 2, "question": "Why is it dark?", "answer": "Night.",
                           "a_objects": [], "q_objects": []}]},
    ]  # fmt: skip
    return image_data, qas


def test_visual_genome_reads_its_layout(tmp_path, files):
    image_data, qas = _vg_fixture(tmp_path, files)
    _write(tmp_path / "image_data.json", image_data)
    _write(tmp_path / "question_answers.json", qas)
    dataset = load_visual_genome_qa(
        tmp_path / "question_answers.json", tmp_path / "image_data.json", tmp_path
    )
    assert [r["question_type"] for r in dataset.records] == ["what", "where", "why"]
    sample = dataset[2]
    assert (
        sample["answers"] == ["Night."] and sample["answer"] == "Night." and sample["image_id"] == 2
    )
    assert sample["question_id"] == 20
    expected = np.asarray(Image.open(tmp_path / "VG_100K_2" / "2.jpg").convert("RGB"))
    assert np.array_equal(np.asarray(sample["image"]), expected)


def _vg_unknown_image(image_data, qas, root, files):
    qas[1]["qas"][0]["image_id"] = 99


def _vg_missing_file(image_data, qas, root, files):
    (root / "VG_100K_2" / "2.jpg").unlink()


def _vg_corrupt_file(image_data, qas, root, files):
    files.corrupt(root / "VG_100K_2" / "2.jpg")


def _vg_malformed(image_data, qas, root, files):
    del qas[1]["qas"][0]["answer"]


VG_CASES = [
    (_vg_unknown_image, "missing image", "image_data.json"),
    (_vg_missing_file, "missing image", "2.jpg"),
    (_vg_corrupt_file, "corrupt image", "2.jpg"),
    (_vg_malformed, "malformed", "question_answers.json"),
]


@pytest.mark.parametrize("mutate, reason, file", VG_CASES, ids=[c[0].__name__ for c in VG_CASES])
def test_visual_genome_bad_records_in_both_modes(tmp_path, files, mutate, reason, file):
    image_data, qas = _vg_fixture(tmp_path, files)
    mutate(image_data, qas, tmp_path, files)
    _write(tmp_path / "image_data.json", image_data)
    _write(tmp_path / "question_answers.json", qas)
    args = (tmp_path / "question_answers.json", tmp_path / "image_data.json", tmp_path)
    with pytest.raises(BadRecordError) as info:
        load_visual_genome_qa(*args)
    assert info.value.reason == reason and info.value.file.endswith(file)
    dataset = load_visual_genome_qa(*args, on_bad_record="skip")
    assert [r["question_id"] for r in dataset.records] == [10, 11]
    assert dataset.summary.by_reason == {reason: 1}
