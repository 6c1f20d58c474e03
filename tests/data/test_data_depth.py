"""Depth loaders (folder, ScanNet-style, KITTI), the scenes' depth maps, and the driving data
sets' detection loaders (KITTI object labels, BDD100K boxes), on files written here."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from distiq.data import (
    BadRecordError,
    generate_scenes,
    load_bdd100k_detection,
    load_depth_folder,
    load_kitti_depth,
    load_kitti_detection,
    load_scannet_depth,
)
from distiq.data._generate import FAR_DEPTH, NEAR_DEPTH
from distiq.data.formats import save_png


def _image(path, size=(6, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), 90, np.uint8)).save(path)


def _depth(path, values):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(path, np.asarray(values, dtype=np.uint16))


def test_folder_reads_metres_and_names_bad_records(tmp_path):
    images, depths = tmp_path / "images", tmp_path / "depth"
    for name in ("a_1", "b_2", "c_3", "d_4"):
        _image(images / f"{name}.png")
    _depth(depths / "a_1.png", np.full((6, 8), 2500))
    _depth(depths / "c_3.png", np.zeros((6, 8)))  # nothing measured
    _depth(depths / "d_4.png", np.full((5, 8), 1000))  # another size
    with pytest.raises(BadRecordError, match="b_2.*depth map .* is missing.*on_bad_record"):
        load_depth_folder(images, depths)
    data = load_depth_folder(images, depths, on_bad_record="skip")
    assert len(data) == 1 and data.summary.skipped == 3
    assert data.summary.by_reason == {"malformed": 2, "missing annotation": 1}
    sample = data[0]
    assert sample["image_id"] == 1 and tuple(sample["depth"].shape) == (6, 8)
    assert float(sample["depth"][0, 0]) == pytest.approx(2.5)
    in_metres = load_depth_folder(images, depths, depth_scale=1.0, on_bad_record="skip")
    assert float(in_metres[0]["depth"].max()) == 2500.0


def test_scannet_frames_resize_colour_to_depth(tmp_path):
    scene = tmp_path / "scene0000_00"
    _image(scene / "color" / "0.jpg", size=(12, 16))
    _depth(scene / "depth" / "0.png", np.full((6, 8), 1200))
    data = load_scannet_depth(tmp_path)
    sample = data[0]
    assert sample["image"].size == (8, 6) and float(sample["depth"].mean()) == pytest.approx(1.2)


def test_kitti_depth_layouts(tmp_path):
    selection = tmp_path / "depth_selection" / "val_selection_cropped"
    name = "2011_09_26_drive_0002_sync_{}_0000000005_image_02.png"
    _image(selection / "image" / name.format("image"))
    _depth(selection / "groundtruth_depth" / name.format("groundtruth_depth"), np.full((6, 8), 512))
    (sample,) = load_kitti_depth(tmp_path)
    assert float(sample["depth"][0, 0]) == pytest.approx(2.0)  # metres x 256
    drive = "2011_09_26_drive_0001_sync"
    _depth(
        tmp_path / "val" / drive / "proj_depth" / "groundtruth" / "image_02" / "07.png",
        np.full((6, 8), 256),
    )
    _image(tmp_path / "raw" / "2011_09_26" / drive / "image_02" / "data" / "07.png")
    (sample,) = load_kitti_depth(tmp_path, "val", raw_root=tmp_path / "raw")
    assert float(sample["depth"][0, 0]) == pytest.approx(1.0)


def test_scene_depth_is_a_ground_plane_with_objects_standing_on_it(tmp_path):
    scenes = generate_scenes(tmp_path, count=6, image_size=48, workers=1)
    data = scenes.depth("train")
    boxes = json.loads(scenes["train"].instances.read_text())["annotations"]
    sample = data[0]
    depth = sample["depth"].numpy()
    rows = (np.arange(48) + 0.5) / 48
    ground = FAR_DEPTH - (FAR_DEPTH - NEAR_DEPTH) * rows
    background = np.isclose(depth, np.round(ground[:, None] * 1000) / 1000, atol=1e-3)
    assert background.mean() > 0.5  # most of the picture is the ground plane
    assert depth[0].mean() > depth[-1].mean()  # far at the top, near at the bottom
    for box in (b for b in boxes if b["image_id"] == sample["image_id"]):
        x, y, w, h = box["bbox"]
        bottom = round(ground[y + h - 1] * 1000) / 1000
        assert np.isclose(depth[y : y + h, x : x + w], bottom, atol=1e-3).any()


def test_kitti_object_labels(tmp_path):
    root = tmp_path / "training"
    for name in ("000000", "000001"):
        _image(root / "image_2" / f"{name}.png", size=(50, 80))
    (root / "label_2").mkdir()
    line = "{} 0.00 0 -1.5 {} {} {} {} 1.5 1.6 3.7 -1.0 1.8 13.0 -1.6"
    (root / "label_2" / "000000.txt").write_text(
        "\n".join(
            [
                line.format("Car", 10.5, 5, 40, 30),
                line.format("DontCare", 0, 0, 5, 5),
                line.format("Pedestrian", 50, 10, 60, 45),
            ]
        )
    )
    (root / "label_2" / "000001.txt").write_text(line.format("Boat", 1, 1, 5, 5))
    with pytest.raises(BadRecordError, match="class 'Boat' is unknown"):
        load_kitti_detection(root)
    data = load_kitti_detection(root, on_bad_record="skip")
    assert len(data) == 1 and data.summary.by_reason == {"label outside map": 1}
    sample = data[0]
    assert sample["boxes"].tolist() == [[10.5, 5, 40, 30], [50, 10, 60, 45]]
    assert [data.classes[i] for i in sample["labels"]] == ["Car", "Pedestrian"]
    kept = load_kitti_detection(root, ids=["000001"], drop_other_classes=True)
    assert len(kept) == 1 and len(kept[0]["boxes"]) == 0


def test_bdd100k_boxes(tmp_path):
    images = tmp_path / "images"
    for name in ("a.jpg", "b.jpg"):
        _image(images / name, size=(40, 60))
    frames = [
        {"name": "a.jpg", "labels": [
            {"category": "car", "box2d": {"x1": 1, "y1": 2, "x2": 30, "y2": 20}},
            {"category": "person", "box2d": {"x1": 40, "y1": 5, "x2": 50, "y2": 35}},
            {"category": "drivable area", "poly2d": []},
            {"category": "lane", "box2d": {"x1": 1, "y1": 1, "x2": 2, "y2": 2}}]},
        {"name": "b.jpg", "labels": [{"category": "car", "box2d": {"x1": 5, "y1": 5, "x2": 2, "y2": 9}}]},
    ]  # fmt: skip
    (tmp_path / "labels.json").write_text(json.dumps(frames))
    with pytest.raises(BadRecordError, match="no positive width"):
        load_bdd100k_detection(tmp_path / "labels.json", images)
    data = load_bdd100k_detection(tmp_path / "labels.json", images, on_bad_record="skip")
    sample = data[0]
    assert [data.classes[i] for i in sample["labels"]] == ["car", "pedestrian"]
    assert sample["boxes"].tolist() == [[1, 2, 30, 20], [40, 5, 50, 35]]
