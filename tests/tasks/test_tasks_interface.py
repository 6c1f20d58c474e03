"""The uniform task interface, used generically the way a training loop would."""

import subprocess
import sys

import pytest
import torch

from distiq.config import ConfigError, from_dict, to_dict
from distiq.tasks import TASKS, Task, build_task


def _grid(size=32, stride=8):
    centres = torch.arange(stride / 2, size, stride)
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)


def _case(name, seed):
    """(task, outputs, batch, predictions) for a tiny batch of 2."""
    g = torch.Generator().manual_seed(seed)
    if name == "vqa":
        labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 6, 0]])
        batch = {
            "labels": labels,
            "answers": [["2"] * 10, ["red"] * 3 + ["blue"] * 7],
            "question_type": ["count", "color"],
        }
        return build_task("vqa"), {"logits": torch.randn(2, 5, 7, generator=g)}, batch, ["2", "red"]
    if name == "detection":
        outputs = {
            "cls_logits": torch.randn(2, 16, 3, generator=g),
            "box_ltrb": torch.rand(2, 16, 4, generator=g) * 12,
            "points": _grid(),
            "stride": 8,
        }
        batch = {
            "boxes": [
                torch.tensor([[2.0, 2.0, 20.0, 18.0]]),
                torch.tensor([[10.0, 8.0, 30.0, 30.0]]),
            ],
            "labels": [torch.tensor([1]), torch.tensor([2])],
        }
        task = build_task("detection", num_classes=3)
        return task, outputs, batch, task.predict(outputs)
    task = build_task("segmentation", num_classes=4)
    logits = torch.randn(2, 4, 6, 6, generator=g)
    return task, logits, {"mask": torch.randint(0, 4, (2, 6, 6), generator=g)}, task.predict(logits)


def _kl(teacher, student):
    """Forward KL(teacher ‖ student) over the last axis, mean over masked positions."""
    log_t, log_s = teacher["logits"].log_softmax(-1), student["logits"].log_softmax(-1)
    per_position = (log_t.exp() * (log_t - log_s)).sum(-1)
    if teacher["mask"] is not None:
        per_position = per_position[teacher["mask"]]
    return per_position.mean()


def _perturbed(outputs):
    if isinstance(outputs, torch.Tensor):
        return outputs * 1.7  # a shift alone would leave a softmax unchanged
    return {
        k: (
            v * 1.7
            if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "points"
            else v
        )
        for k, v in outputs.items()
    }


@pytest.mark.parametrize("name", ["vqa", "detection", "segmentation"])
def test_generic_loop_over_every_task(name):
    task, outputs, batch, predictions = _case(name, 0)
    assert isinstance(task, Task) and task.name == name
    out = task.loss(outputs, batch)
    assert out.total.dim() == 0 and torch.isfinite(out.total)
    assert torch.allclose(out.total, sum(out.terms.values()))
    assert all(isinstance(v, float) for v in out.stats.values())
    # the distillation view: same structure for teacher and student, KL 0 only when equal
    view = task.distill_view(outputs, batch)
    other = task.distill_view(_perturbed(outputs), batch)
    assert set(view) == {"distributions", "regressions"} and view["distributions"]
    for key, dist in view["distributions"].items():
        assert dist["logits"].shape == other["distributions"][key]["logits"].shape
        assert _kl(dist, dist).item() == pytest.approx(0.0, abs=1e-6)
        assert _kl(dist, other["distributions"][key]).item() > 0
    for key, reg in view["regressions"].items():
        assert reg["values"].shape == other["regressions"][key]["values"].shape
    # the metric accumulator
    metric = task.metric()
    metric.update(predictions, batch)
    extra = task.metric()
    extra.update(predictions, batch)
    metric.merge(extra)
    values = metric.compute()
    assert task.primary_metric in values and 0.0 <= values[task.primary_metric] <= 1.0
    metric.reset()


def test_detection_view_is_bernoulli_kl():
    task, outputs, _, _ = _case("detection", 1)
    z_t, z_s = outputs["cls_logits"], outputs["cls_logits"] * 0.5 - 1
    view_t = task.distill_view(outputs)["distributions"]["cls"]
    view_s = task.distill_view({**outputs, "cls_logits": z_s})["distributions"]["cls"]
    p, q = torch.sigmoid(z_t), torch.sigmoid(z_s)
    bernoulli = (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).mean()
    assert _kl(view_t, view_s).item() == pytest.approx(bernoulli.item(), rel=1e-5)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("vqa", {"label_smoothing": 0.1}),
        ("detection", {"num_classes": 5, "center_sampling": False}),
        ("segmentation", {"num_classes": 19, "class_names": [str(i) for i in range(19)]}),
    ],
)
def test_tasks_are_configs_that_round_trip(name, options):
    task = build_task(name, **options)
    assert from_dict(TASKS.get(name), to_dict(task)) == task


def test_bad_options_are_reported_together():
    with pytest.raises(ConfigError) as info:
        build_task("detection", num_clases=3, nms_iou="high")
    message = str(info.value)
    assert "did you mean 'num_classes'" in message and "nms_iou" in message
    with pytest.raises(ConfigError, match="label_smoothing"):
        build_task("vqa", label_smoothing=1.5)
    with pytest.raises(KeyError, match="did you mean 'segmentation'"):
        build_task("segmentaton")


def test_import_is_light():
    code = "import sys, distiq.tasks; print('pycocotools' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
