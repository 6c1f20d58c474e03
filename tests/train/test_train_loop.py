"""The loop's behaviour on tiny toys: learning, accumulation, clipping, logging, evaluation and
best-checkpoint selection, callbacks, run-directory safety, bad step outputs."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from distiq.config import ConfigError, from_dict
from distiq.train import StepInfo, TrainConfig, load_model_weights, read_metrics, train


def cpu_config(**values) -> TrainConfig:
    """Every test pins the CPU, so that a CUDA machine runs them the same way."""
    return TrainConfig(**{"device": "cpu", **values})


def test_training_reduces_the_loss_and_logs_every_term(toys, tmp_path):
    data = toys.ToyData(96)
    model = toys.make_model()
    config = cpu_config(steps=40, lr=2e-2, batch_size=16, log_every=5, warmup_steps=4)
    result = train(model, toys.plain_step, data, config=config, run_dir=tmp_path)
    lines = read_metrics(tmp_path / "metrics.jsonl", "train")
    assert [line["step"] for line in lines] == list(range(5, 41, 5))
    for line in lines:
        assert set(line) == {
            "kind",
            "step",
            "epoch",
            "lr",
            "total",
            "terms",
            "grad_norm",
            "seconds",
        }
        assert set(line["terms"]) == {"task", "l2"}
        assert line["total"] == pytest.approx(line["terms"]["task"] + line["terms"]["l2"], rel=1e-6)
    assert lines[-1]["total"] < 0.7 * lines[0]["total"]
    assert result.step == 40 and result.last_log == lines[-1]
    assert lines[-1]["epoch"] == 40 * 16 // 96  # 6 batches per epoch
    # the final checkpoint holds the final weights
    fresh = toys.make_model(seed=1)
    load_model_weights(fresh, result.checkpoint)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)


def test_logged_lr_follows_the_schedule(toys, tmp_path):
    config = cpu_config(
        steps=12, lr=0.1, warmup_steps=4, schedule="linear", batch_size=8, log_every=1
    )
    train(toys.make_model(), toys.plain_step, toys.ToyData(32), config=config, run_dir=tmp_path)
    lrs = [line["lr"] for line in read_metrics(tmp_path / "metrics.jsonl", "train")]
    expected = [0.1 * (k + 1) / 4 for k in range(4)] + [
        0.1 * (1 - (k - 4) / 8) for k in range(4, 12)
    ]
    assert lrs == pytest.approx(expected, rel=1e-12)


def test_gradient_accumulation_matches_one_big_batch(toys, tmp_path):
    """grad_accum=4 x batch 4 takes the same steps as batch 16 (the same 16 samples per step,
    equal-sized micro-batches, mean losses), up to float rounding."""
    data = toys.ToyData(64)
    base = dict(steps=6, lr=5e-2, shuffle=True, seed=3, grad_clip=None)
    big = toys.make_model()
    train(
        big,
        toys.plain_step,
        data,
        config=cpu_config(batch_size=16, **base),
        run_dir=tmp_path / "a",
    )
    small = toys.make_model()
    # Same sample order: shuffle once per epoch over 64 samples, 4 micro-batches of 4 = 1 batch of 16.
    train(
        small,
        toys.plain_step,
        data,
        config=cpu_config(batch_size=4, grad_accum=4, **base),
        run_dir=tmp_path / "b",
    )
    for key, value in big.state_dict().items():
        torch.testing.assert_close(small.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    # the logged loss of an accumulated step is the mean over its micro-batches
    a = read_metrics(tmp_path / "a" / "metrics.jsonl", "train")[-1]
    b = read_metrics(tmp_path / "b" / "metrics.jsonl", "train")[-1]
    assert b["total"] == pytest.approx(a["total"], rel=1e-5)


def test_gradient_clipping_matches_a_hand_made_clipped_adamw(toys, tmp_path):
    """Two steps on two fixed batches: the norm is measured before clipping, and the parameters
    equal a hand-written clip + AdamW (and differ from the unclipped result)."""
    data = toys.ToyData(16)
    model = toys.make_model()
    config = cpu_config(
        steps=2,
        lr=0.1,
        batch_size=8,
        shuffle=False,
        grad_clip=0.05,
        weight_decay=0.0,
        schedule="constant",
    )
    seen: list[StepInfo] = []
    train(model, toys.plain_step, data, config=config, run_dir=tmp_path, on_step=seen.append)

    def reference(clip):
        ref = toys.make_model()
        optimizer = torch.optim.AdamW(ref.parameters(), lr=0.1, weight_decay=0.0)
        norms = []
        for i in (0, 8):
            optimizer.zero_grad()
            toys.plain_step(
                ref, {"x": data.x[i : i + 8], "y": data.y[i : i + 8]}, 0
            ).total.backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)))
            optimizer.step()
        return ref.state_dict(), norms

    clipped, norms = reference(0.05)
    assert [s.grad_norm for s in seen] == pytest.approx(norms, rel=1e-6)
    assert min(norms) > 0.05  # clipping is active on both steps
    for key, value in clipped.items():  # bit for bit: the loop's multi-tensor AdamW on CPU
        assert torch.equal(model.state_dict()[key], value), key  # is the per-tensor one
    unclipped, _ = reference(float("inf"))
    assert max((unclipped[k] - clipped[k]).abs().max() for k in clipped) > 1e-4


def test_weight_decay_only_on_weights(toys, tmp_path):
    """A zero loss leaves only weight decay: matrices shrink by (1 - lr * wd), biases do not."""
    model = toys.make_model()
    before = toys.params_of(model)

    def zero_step(model, batch, step):
        return 0.0 * model(batch["x"]).sum()

    config = cpu_config(steps=1, lr=0.1, weight_decay=0.5, batch_size=8, grad_clip=None)
    train(model, zero_step, toys.ToyData(8), config=config, run_dir=tmp_path)
    after = model.state_dict()
    torch.testing.assert_close(after["fc1.weight"], before["fc1.weight"] * (1 - 0.1 * 0.5))
    assert torch.equal(after["fc1.bias"], before["fc1.bias"])


def test_multi_tensor_adamw_with_decay_groups_is_the_per_tensor_one(toys, tmp_path):
    """The loop asks for torch's multi-tensor AdamW on CPU: with its two groups (decay on
    matrices only) it must leave the same parameters, bit for bit, as the per-tensor loop."""
    from distiq.train.loop import _param_groups

    data = toys.ToyData(32)
    model = toys.make_model()
    config = cpu_config(
        steps=4, lr=0.05, batch_size=8, shuffle=False, weight_decay=0.1, grad_clip=None,
        schedule="constant",
    )  # fmt: skip
    train(model, toys.plain_step, data, config=config, run_dir=tmp_path)
    ref = toys.make_model()
    groups = _param_groups(ref, None, 0.1)
    assert len(groups) == 2 and {g["weight_decay"] for g in groups} == {0.0, 0.1}
    optimizer = torch.optim.AdamW(groups, lr=0.05, weight_decay=0.1, foreach=False)
    for i in range(0, 32, 8):
        optimizer.zero_grad()
        toys.plain_step(ref, {"x": data.x[i : i + 8], "y": data.y[i : i + 8]}, 0).total.backward()
        optimizer.step()
    for key, value in ref.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_evaluation_and_best_checkpoint_by_max_and_min(toys, tmp_path):
    data = toys.ToyData(64)
    # The metric sequence is scripted so that the best step is known: eval at 2, 4, 6, 8.
    script = iter([50.0, 70.0, 60.0, 65.0])
    snapshots = {}

    def eval_fn(model):
        return {"accuracy": next(script), "loss": 1.0}

    def on_eval(step, metrics):
        snapshots[step] = toys.params_of(model)

    model = toys.make_model()
    config = cpu_config(
        steps=8, batch_size=8, eval_every=2, best_metric="accuracy", best_mode="max"
    )
    result = train(
        model,
        toys.plain_step,
        data,
        config=config,
        run_dir=tmp_path / "max",
        eval_fn=eval_fn,
        on_eval=on_eval,
    )
    assert (result.best_step, result.best_value) == (4, 70.0)
    evals = read_metrics(tmp_path / "max" / "metrics.jsonl", "eval")
    assert [(e["step"], e["best"]) for e in evals] == [(2, True), (4, True), (6, False), (8, False)]
    best = toys.make_model(seed=5)
    meta = load_model_weights(best, result.best_checkpoint)
    assert meta["step"] == 4 and meta["metrics"]["accuracy"] == 70.0
    for key, value in snapshots[4].items():
        assert torch.equal(best.state_dict()[key], value)

    losses = iter([3.0, 2.0, 2.5])
    model = toys.make_model()
    config = cpu_config(
        steps=6,
        batch_size=8,
        eval_every=2,
        best_metric="loss",
        best_mode="min",
        load_best_at_end=True,
    )
    result = train(
        model,
        toys.plain_step,
        data,
        config=config,
        run_dir=tmp_path / "min",
        eval_fn=lambda m: {"loss": next(losses)},
    )
    assert (result.best_step, result.best_value) == (4, 2.0)
    best = toys.make_model(seed=5)
    load_model_weights(best, result.best_checkpoint)
    for key, value in best.state_dict().items():  # load_best_at_end put step 4's weights back
        assert torch.equal(model.state_dict()[key], value)


def test_real_eval_fn_runs_in_eval_mode_without_grad(toys, tmp_path):
    val = toys.ToyData(40, seed=2)
    inner = toys.make_eval(val)
    modes = []

    def eval_fn(model):
        modes.append((model.training, torch.is_grad_enabled()))
        return inner(model)

    model = toys.make_model(dropout=0.5)
    config = cpu_config(steps=4, batch_size=8, eval_every=2, best_metric="accuracy")
    result = train(
        model, toys.plain_step, toys.ToyData(32), config=config, run_dir=tmp_path, eval_fn=eval_fn
    )
    assert modes == [(False, False), (False, False)]
    assert model.training  # back to training mode afterwards
    with torch.no_grad():
        logits = model.eval()(val.x)
    assert result.eval_metrics["loss"] == pytest.approx(
        float(F.cross_entropy(logits, val.y)), rel=1e-5
    )


def test_unknown_best_metric_is_named(toys, tmp_path):
    config = cpu_config(steps=2, batch_size=8, eval_every=1, best_metric="acuracy")
    with pytest.raises(KeyError, match=r"'acuracy'.*did you mean 'accuracy'"):
        train(
            toys.make_model(),
            toys.plain_step,
            toys.ToyData(16),
            config=config,
            run_dir=tmp_path,
            eval_fn=lambda m: {"accuracy": 1.0},
        )


def test_on_step_sees_every_step(toys, tmp_path):
    infos: list[StepInfo] = []
    config = cpu_config(steps=7, batch_size=8, log_every=3)
    train(
        toys.make_model(),
        toys.plain_step,
        toys.ToyData(16),
        config=config,
        run_dir=tmp_path,
        on_step=infos.append,
    )
    assert [i.step for i in infos] == list(range(1, 8))
    assert [i.logged for i in infos] == [False, False, True, False, False, True, True]
    assert all(
        set(i.terms) == {"task", "l2"} and i.steps == 7 and math.isfinite(i.total) for i in infos
    )


def test_ready_made_batches_and_step_outputs(toys, tmp_path):
    """An iterable of batches cycles over epochs; a bare tensor and a (total, terms) tuple work."""
    data = toys.ToyData(16)
    batches = [{"x": data.x[i : i + 4], "y": data.y[i : i + 4]} for i in range(0, 16, 4)]

    def tensor_step(model, batch, step):
        return F.cross_entropy(model(batch["x"]), batch["y"])

    result = train(
        toys.make_model(),
        tensor_step,
        batches,
        config=cpu_config(steps=9, log_every=9),
        run_dir=tmp_path / "a",
    )
    assert result.step == 9 and result.last_log["terms"] == {} and result.last_log["epoch"] == 2

    def tuple_step(model, batch, step):
        loss = F.cross_entropy(model(batch["x"]), batch["y"])
        return loss, {"ce": loss}

    result = train(
        toys.make_model(),
        tuple_step,
        batches,
        config=cpu_config(steps=2, log_every=1),
        run_dir=tmp_path / "b",
    )
    assert set(result.last_log["terms"]) == {"ce"}


def test_bad_step_outputs_are_explained(toys, tmp_path):
    data = toys.ToyData(16)
    config = cpu_config(steps=1, batch_size=8)
    with pytest.raises(TypeError, match="step_fn returned dict"):
        train(
            toys.make_model(),
            lambda m, b, s: {"loss": 1},
            data,
            config=config,
            run_dir=tmp_path / "a",
        )

    def no_grad_step(model, batch, step):
        with torch.no_grad():
            return F.cross_entropy(model(batch["x"]), batch["y"])

    with pytest.raises(RuntimeError, match="does not require grad"):
        train(toys.make_model(), no_grad_step, data, config=config, run_dir=tmp_path / "b")

    def vector_term(model, batch, step):
        loss = F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")
        return loss.mean(), {"per_sample": loss}

    with pytest.raises(ValueError, match="'per_sample' has shape"):
        train(toys.make_model(), vector_term, data, config=config, run_dir=tmp_path / "c")

    frozen = toys.make_model().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(frozen, toys.plain_step, data, config=config, run_dir=tmp_path / "d")


def test_run_directory_is_not_clobbered(toys, tmp_path):
    data = toys.ToyData(16)
    config = cpu_config(steps=1, batch_size=8, best_metric="accuracy", eval_every=1)
    train(
        toys.make_model(),
        toys.plain_step,
        data,
        config=config,
        run_dir=tmp_path,
        eval_fn=lambda m: {"accuracy": 1.0},
    )
    with pytest.raises(FileExistsError, match="already holds a run") as info:
        train(toys.make_model(), toys.plain_step, data, config=config, run_dir=tmp_path)
    # phrased for command-line and Python users alike
    assert (
        "pass --resume (resume=True in Python) to continue it, --overwrite (overwrite=True in "
        "Python) to start over" in str(info.value)
    )
    with pytest.raises(FileNotFoundError, match="cannot resume.*without --resume"):
        train(
            toys.make_model(),
            toys.plain_step,
            data,
            config=config,
            run_dir=tmp_path / "new",
            resume=True,
        )
    assert not (tmp_path / "new").exists()  # a failed resume creates nothing
    with pytest.raises(ValueError, match=r"--resume \(resume=True in Python\) and --overwrite"):
        train(toys.make_model(), toys.plain_step, data, config=config, run_dir=tmp_path,
              resume=True, overwrite=True)  # fmt: skip
    # overwrite starts over and removes the stale best checkpoint
    train(
        toys.make_model(),
        toys.plain_step,
        data,
        config=cpu_config(steps=1, batch_size=8),
        run_dir=tmp_path,
        overwrite=True,
    )
    assert not (tmp_path / "checkpoints" / "best.pt").exists()
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 1


def test_config_validation_lists_every_problem():
    with pytest.raises(ConfigError) as info:
        from_dict(
            TrainConfig,
            {
                "steps": 0,
                "lr": -1.0,
                "warmup_step": 3,
                "schedule": "cosin",
                "grad_clip": 0.0,
                "device": "gpu",
            },
        )
    message = str(info.value)
    for fragment in (
        "warmup_step",
        "did you mean 'warmup_steps'",
        "'cosin'",
        "did you mean 'cosine'",
    ):
        assert fragment in message
    with pytest.raises(ConfigError) as info:
        from_dict(
            TrainConfig,
            {"steps": 0, "lr": -1.0, "grad_clip": 0.0, "device": "gpu", "warmup_steps": 5},
        )
    assert len(info.value.errors) == 5  # steps, lr, warmup > steps, grad_clip, device
    assert from_dict(TrainConfig, {"steps": 10, "betas": [0.9, 0.95]}).betas == (0.9, 0.95)
    with pytest.raises(ConfigError, match="load_best_at_end needs best_metric"):
        cpu_config(steps=3, load_best_at_end=True).check()


def test_bf16_is_refused_off_cuda(toys, tmp_path):
    config = cpu_config(steps=1, batch_size=8, precision="bf16")
    with pytest.raises(RuntimeError, match="bf16 needs a CUDA device"):
        train(toys.make_model(), toys.plain_step, toys.ToyData(8), config=config, run_dir=tmp_path)
    # auto falls back to fp32 off CUDA
    config = cpu_config(steps=1, batch_size=8, precision="auto")
    train(
        toys.make_model(),
        toys.plain_step,
        toys.ToyData(8),
        config=config,
        run_dir=tmp_path / "auto",
    )


def test_config_is_saved_with_the_run(toys, tmp_path):
    from distiq.config import load_yaml

    config = cpu_config(steps=1, batch_size=8, lr=3e-3)
    train(toys.make_model(), toys.plain_step, toys.ToyData(8), config=config, run_dir=tmp_path)
    assert from_dict(TrainConfig, load_yaml(tmp_path / "train_config.yaml")) == config
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1


@pytest.mark.gpu
def test_bf16_autocast_on_cuda(toys, tmp_path):
    seen = []

    def step(model, batch, step):
        logits = model(batch["x"])
        seen.append(logits.dtype)
        return F.cross_entropy(logits.float(), batch["y"])

    config = TrainConfig(steps=2, batch_size=8, precision="bf16", device="cuda")
    model = toys.make_model()
    train(model, step, toys.ToyData(16), config=config, run_dir=tmp_path)
    assert seen == [torch.bfloat16] * 2
    assert next(model.parameters()).dtype == torch.float32  # master weights stay fp32
