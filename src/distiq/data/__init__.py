"""distiq's data layer: the synthetic edge scenes and loaders for real data-set formats.

- :mod:`distiq.data.scenes` — the synthetic scenes generator (``generate_scenes``,
  ``vocabulary``, ``blind_baseline_accuracy``), written in the real formats below.
- :mod:`distiq.data.vqa` — VQA v2 and Visual Genome QA → VQA samples.
- :mod:`distiq.data.detection` — COCO instances JSON and Pascal VOC XML → detection samples;
  :mod:`distiq.data.driving` — KITTI object labels and BDD100K boxes → detection samples.
- :mod:`distiq.data.depth` — depth-PNG folders, ScanNet-style frames, KITTI depth → depth samples.
- :mod:`distiq.data.segmentation` — generic image + mask folder with a label map, Cityscapes,
  KITTI, BDD100K, ADE20K, ScanNet-style frames → segmentation samples.
- :mod:`distiq.data.collate` — collate functions and stratified calibration subsets.
- :mod:`distiq.data.formats` — writers for the formats and the label-map file.
- :mod:`distiq.data.records` — bad-record handling (``on_bad_record="error" | "skip"``).

Sample dicts (the cross-team contract)::

    VQA:          {"image": PIL RGB, "question": str, "answers": list[str], "answer": str,
                   "question_type": str, "question_id": int, "image_id": int}
    detection:    {"image": PIL RGB, "boxes": FloatTensor (N, 4) xyxy pixels,
                   "labels": LongTensor (N,) in [0, num_classes), "image_id": int}
    segmentation: {"image": PIL RGB, "mask": LongTensor (H, W), 255 = ignore, "image_id": int}
    depth:        {"image": PIL RGB, "depth": FloatTensor (H, W) metres, 0 = none, "image_id": int}

``import distiq.data`` imports numpy and PIL only; torch is imported when a sample with tensors
is built.
"""

from distiq.data.collate import (
    calibration_indices,
    calibration_subset,
    collate_detection,
    collate_segmentation,
    collate_vqa,
)
from distiq.data.depth import (
    DepthDataset,
    load_depth_folder,
    load_kitti_depth,
    load_scannet_depth,
)
from distiq.data.detection import (
    VOC_CLASSES,
    DetectionDataset,
    load_coco_detection,
    load_pascal_voc,
)
from distiq.data.driving import (
    BDD100K_DETECTION_CLASSES,
    KITTI_CLASSES,
    load_bdd100k_detection,
    load_kitti_detection,
)
from distiq.data.formats import IGNORE_INDEX, LabelMap, load_label_map, write_label_map
from distiq.data.records import BadRecordError, BadRecordSummary, RecordDataset
from distiq.data.scene_folder import generate_scenes_at
from distiq.data.scenes import (
    SceneConfig,
    ScenePaths,
    blind_baseline_accuracy,
    blind_baseline_by_type,
    generate_scenes,
    vocabulary,
)
from distiq.data.segmentation import (
    SegmentationDataset,
    load_ade20k,
    load_bdd100k,
    load_cityscapes,
    load_kitti_semantic,
    load_scannet_frames,
    load_segmentation_folder,
)
from distiq.data.vqa import VQADataset, load_visual_genome_qa, load_vqa_v2

__all__ = [
    "BDD100K_DETECTION_CLASSES",
    "IGNORE_INDEX",
    "KITTI_CLASSES",
    "VOC_CLASSES",
    "BadRecordError",
    "BadRecordSummary",
    "DepthDataset",
    "DetectionDataset",
    "LabelMap",
    "RecordDataset",
    "SceneConfig",
    "ScenePaths",
    "SegmentationDataset",
    "VQADataset",
    "blind_baseline_accuracy",
    "blind_baseline_by_type",
    "calibration_indices",
    "calibration_subset",
    "collate_detection",
    "collate_segmentation",
    "collate_vqa",
    "generate_scenes",
    "generate_scenes_at",
    "load_ade20k",
    "load_bdd100k",
    "load_bdd100k_detection",
    "load_cityscapes",
    "load_coco_detection",
    "load_depth_folder",
    "load_kitti_depth",
    "load_kitti_detection",
    "load_kitti_semantic",
    "load_label_map",
    "load_pascal_voc",
    "load_scannet_depth",
    "load_scannet_frames",
    "load_segmentation_folder",
    "load_visual_genome_qa",
    "load_vqa_v2",
    "vocabulary",
    "write_label_map",
]
