"""The data of a dense task (segmentation, detection, depth): splits read by distiq's loaders in
the data set's own format, prepared for one model's processing.

A recipe names the data either as a generated scene set (``data.scenes``: class or colour masks,
COCO boxes, millimetre depth maps) or as a ``format`` with one mapping of loader arguments per
split (``data.splits``)::

    task: segmentation
    data:
      format: cityscapes
      splits:
        train: {root: /data/cityscapes, split: train}
        val: {root: /data/cityscapes, split: val}
        test: {root: /data/cityscapes, split: val}
      on_bad_record: skip

The formats and their keys are in :data:`FORMATS` (every key a path or a loader option); a
missing or unknown key is an error that lists the format's keys.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from distiq.util import suggest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataFormat:
    """A loader of one format: ``required`` / ``optional`` keys of a split's mapping (``paths``:
    those that name files or folders), and ``load(args, on_bad_record)``."""

    required: tuple[str, ...]
    optional: tuple[str, ...]
    paths: tuple[str, ...]
    load: Callable[[dict[str, Any], str], Any]


def _coco(args, bad):
    from distiq.data import load_coco_detection

    return load_coco_detection(args["annotations"], args["images"], on_bad_record=bad)


def _voc(args, bad):
    from distiq.data import load_pascal_voc

    return load_pascal_voc(args["root"], args.get("split", "trainval"), on_bad_record=bad)


def _kitti_boxes(args, bad):
    from distiq.data import load_kitti_detection

    return load_kitti_detection(args["root"], split_file=args.get("ids"), on_bad_record=bad)


def _bdd_boxes(args, bad):
    from distiq.data import load_bdd100k_detection

    return load_bdd100k_detection(args["labels"], args["images"], on_bad_record=bad)


def _seg_folder(args, bad):
    from distiq.data import load_segmentation_folder

    return load_segmentation_folder(
        args["images"], args["masks"], args["label_map"], on_bad_record=bad
    )


def _seg_root(loader: str, default_split: str | None):
    def load(args, bad):
        import distiq.data as data

        kwargs = {"on_bad_record": bad}
        if default_split is not None:
            kwargs["split"] = args.get("split", default_split)
        return getattr(data, loader)(args["root"], **kwargs)

    return load


def _depth_folder(args, bad):
    from distiq.data import load_depth_folder

    return load_depth_folder(
        args["images"], args["depth"], depth_scale=float(args.get("depth_scale", 1000.0)),
        on_bad_record=bad,
    )  # fmt: skip


def _scannet_depth(args, bad):
    from distiq.data import load_scannet_depth

    return load_scannet_depth(args["root"], on_bad_record=bad)


def _kitti_depth(args, bad):
    from distiq.data import load_kitti_depth

    return load_kitti_depth(
        args["root"], args.get("split", "val"), raw_root=args.get("raw_root"), on_bad_record=bad
    )


FORMATS: dict[str, dict[str, DataFormat]] = {
    "detection": {
        "coco": DataFormat(("annotations", "images"), (), ("annotations", "images"), _coco),
        "voc": DataFormat(("root",), ("split",), ("root",), _voc),
        "kitti": DataFormat(("root",), ("ids",), ("root", "ids"), _kitti_boxes),
        "bdd100k": DataFormat(("labels", "images"), (), ("labels", "images"), _bdd_boxes),
    },
    "segmentation": {
        "folder": DataFormat(
            ("images", "masks", "label_map"), (), ("images", "masks", "label_map"), _seg_folder
        ),
        "cityscapes": DataFormat(("root",), ("split",), ("root",), _seg_root("load_cityscapes", "train")),
        "kitti": DataFormat(("root",), ("split",), ("root",), _seg_root("load_kitti_semantic", "training")),
        "bdd100k": DataFormat(("root",), ("split",), ("root",), _seg_root("load_bdd100k", "train")),
        "ade20k": DataFormat(("root",), ("split",), ("root",), _seg_root("load_ade20k", "training")),
        "scannet": DataFormat(("root",), (), ("root",), _seg_root("load_scannet_frames", None)),
    },
    "depth": {
        "folder": DataFormat(("images", "depth"), ("depth_scale",), ("images", "depth"), _depth_folder),
        "scannet": DataFormat(("root",), (), ("root",), _scannet_depth),
        "kitti": DataFormat(("root",), ("split", "raw_root"), ("root", "raw_root"), _kitti_depth),
    },
}  # fmt: skip


def data_format(task: str, name: str) -> DataFormat:
    """The loader of format ``name`` for ``task``.

    Raises:
        ValueError: the task reads no such format (its formats listed).
    """
    known = FORMATS[task]
    if name not in known:
        raise ValueError(
            f"data.format {name!r} is not a {task} format{suggest(name, list(known))}; "
            f"{task} data: {', '.join(known)} (or data.scenes)"
        )
    return known[name]


def check_split_args(task: str, data: Any) -> None:
    """Every split's mapping has the format's keys, and its paths exist.

    Raises:
        ValueError: a split missing, a key missing or unknown; FileNotFoundError: a path.
    """
    fmt = data_format(task, data.format)
    for split in (data.train_split, data.val_split, data.test_split):
        args = (data.splits or {}).get(split)
        if not isinstance(args, dict):
            have = ", ".join(data.splits or {}) or "none"
            raise ValueError(
                f"data.splits has no {split!r} mapping (it has {have}); give each split the "
                f"{data.format} keys: {', '.join(fmt.required)}"
            )
        missing = [k for k in fmt.required if k not in args]
        unknown = [k for k in args if k not in fmt.required + fmt.optional]
        if missing or unknown:
            raise ValueError(
                f"data.splits.{split} ({data.format}): "
                + "; ".join(
                    [f"missing {', '.join(missing)}"] * bool(missing)
                    + [f"unknown {', '.join(unknown)}"] * bool(unknown)
                )
                + f"; its keys are {', '.join(fmt.required + fmt.optional)}"
            )
        for key in fmt.paths:
            if key in args and not Path(args[key]).exists():
                raise FileNotFoundError(f"data.splits.{split}.{key}: {args[key]} does not exist")


def load_records(task: str, data: Any, split: str) -> Any:
    """The split's samples (a ``distiq.data`` ``RecordDataset``) from the scenes or the format."""
    if data.scenes is not None:
        from distiq.data import ScenePaths

        scenes = ScenePaths.at(data.scenes)
        bad = data.on_bad_record
        if task == "detection":
            return scenes.detection(split, on_bad_record=bad)
        if task == "segmentation":
            return scenes.segmentation(split, target=data.segmentation_target, on_bad_record=bad)
        return scenes.depth(split, on_bad_record=bad)
    return data_format(task, data.format).load(dict(data.splits[split]), data.on_bad_record)


class DenseSplit(Dataset):
    """One split of a dense task for one model's processing (map-style dataset).

    Item ``i``: ``{"index": i, "image_id", "pixel_values": (3, H, W), "size": (h, w) of the
    original image, and the targets: "mask" (h, w) long | "boxes" (N, 4) xyxy pixels + "labels"
    (N,) | "depth" (h, w) metres}``. Pixel values are computed once per image and kept
    (``cache``). ``collate`` makes the batches of the forward path
    (:class:`~distiq.train.engine_tasks.dense_engine.DenseEngine`).

    Args:
        records: the split's samples (``distiq.data`` dataset: ``dataset[i]`` a sample dict).
        adapter: the model's :class:`distiq.models.DenseAdapter`.
        task: ``segmentation`` | ``detection`` | ``depth``.
    """

    path = None  # the VQA splits' forward-path attribute; dense splits have one forward path

    def __init__(self, records: Any, adapter: Any, task: str, *, cache: bool = True) -> None:
        self.records = records
        self.adapter = adapter
        self.task = task
        self.cache = cache
        self._items: dict[int, dict[str, Any]] = {}
        self.indices: list[int] = list(range(len(records)))

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(getattr(self.records, "classes", ()) or ())

    def __getitem__(self, index: int) -> dict[str, Any]:
        position = self.indices[index]
        item = self._items.get(position)
        if item is None:
            sample = self.records[position]
            image = sample["image"]
            item = {
                "index": position,
                "image_id": int(sample["image_id"]),
                "pixel_values": self.adapter.pixel_values([image])[0],
                "size": (image.size[1], image.size[0]),
            }
            for key in ("mask", "boxes", "labels", "depth"):
                if key in sample:
                    item[key] = sample[key]
            if self.cache:
                self._items[position] = item
        return item

    def subset(self, indices: Sequence[int]) -> DenseSplit:
        """A view of the items at ``indices`` (sharing the cache)."""
        other = DenseSplit.__new__(DenseSplit)
        other.__dict__.update(self.__dict__)
        other.indices = [self.indices[i] for i in indices]
        return other

    def limit(self, count: int | None) -> DenseSplit:
        """The first ``count`` images (all when None)."""
        return self if count is None or count >= len(self) else self.subset(range(count))

    def for_adapter(self, adapter: Any) -> DenseSplit:
        """The same images prepared for another model's processing."""
        if adapter is self.adapter:
            return self
        other = DenseSplit(self.records, adapter, self.task, cache=self.cache)
        other.indices = list(self.indices)
        return other

    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """A batch: ``pixel_values`` (B, 3, H, W), ``image_id`` (B,), ``sizes`` [(h, w)], the
        original targets (``masks`` / ``boxes`` + ``labels`` / ``depths``: lists, for the
        metrics) and the training targets at the input size H × W: ``mask`` (B, H, W) long
        (nearest), ``targets`` (the model's own, detection), ``depth`` (B, H, W) (nearest)."""
        height, width = self.adapter.input_size
        batch: dict[str, Any] = {
            "pixel_values": torch.stack([item["pixel_values"] for item in items]),
            "image_id": torch.tensor([item["image_id"] for item in items]),
            "sizes": [tuple(item["size"]) for item in items],
        }
        if self.task == "segmentation":
            masks = [item["mask"].long() for item in items]
            batch["masks"] = masks
            batch["mask"] = torch.stack([_nearest(m, (height, width)) for m in masks])
        elif self.task == "detection":
            batch["boxes"] = [item["boxes"].float().reshape(-1, 4) for item in items]
            batch["labels"] = [item["labels"].long().reshape(-1) for item in items]
            batch["targets"] = self.adapter.detection_targets(
                batch["boxes"], batch["labels"], batch["sizes"]
            )
        else:
            depths = [item["depth"].float() for item in items]
            batch["depths"] = depths
            batch["depth"] = torch.stack([_nearest(d, (height, width)) for d in depths])
        return batch


def _nearest(target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A label or depth map ``(h, w)`` resized to ``size`` by nearest neighbour (no new values:
    class indices, the ignore index and "no measurement" zeros stay what they are)."""
    if tuple(target.shape) == tuple(size):
        return target
    resized = F.interpolate(target[None, None].float(), size=size, mode="nearest-exact")[0, 0]
    return resized.to(target.dtype)
