"""Cost of one QAD training step (full objective) vs a plain full-precision fine-tuning step.

Model: a tiny Llama (transformers ``LlamaForCausalLM`` built from a config), teacher and student
of the same shape. Modes, each one optimizer step (AdamW) on the same batch shape:

- ``fp_finetune`` (baseline): student forward, causal-LM cross-entropy, backward, step.
- ``qat_task``: the fake-quantized student (W4 per-channel LSQ, A8 per-token dynamic), task loss
  only — the cost of fake quantization alone.
- ``qad_no_pd``: teacher forward (no grad) + fake-quant student forward/backward + task, kd (τ=2),
  feat (hidden states of every layer, by hooks), qk_entropy and rounding terms.
- ``qad_full``: ``qad_no_pd`` + the prediction-difference term every step (one more no-grad
  student forward with fake quantization disabled).
- ``qad_pd_every4``: ``qad_full`` with ``pd.every: 4``.
- ``qad_cached``: the teacher read from a cache of its top-16 log-probabilities (what
  ``teacher: {cache: ...}`` gives a recipe) instead of run: task, kd (top-k KL), qk_entropy and
  rounding terms on the fake-quant student; no feature term (the cache holds the teacher's
  output distribution only).
- ``qad_cached_pd_every4``: ``qad_cached`` + the prediction-difference term every 4th step.

Components (not training steps; for the breakdown): ``teacher_forward`` (one no-grad teacher
forward) and ``objective_terms`` (the objective's task, kd, feat and rounding terms, forward and
backward, on precomputed logits and hidden states).

Modes take turns step by step (so load drift hits them all alike); the reported time is the
median over repeats of each repeat's mean step time (``--steps`` steps, a multiple of 4 so that
``pd.every: 4`` is counted fairly); ratios are against ``fp_finetune`` of the same run. Writes ``benchmarks/results/objective_overhead.json``.

    .venv/bin/python benchmarks/objective_overhead.py [--quick] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _machine import machine_info  # benchmarks/ is on sys.path when run as a script

RESULTS = Path(__file__).resolve().parent / "results" / "objective_overhead.json"


def build_models(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 4,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.seq,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(config).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = copy.deepcopy(teacher).train()
    for p in student.parameters():
        p.requires_grad_(True)
    return teacher, student


def quantize_student(student):
    """W4 (per-channel, learnable LSQ scales) A8 (per-token dynamic) on every decoder linear."""
    from distiq.quant import PerToken, QuantConfig, QuantSpec, quantize_

    config = QuantConfig(
        weight=QuantSpec(bits=4, learnable=True),
        activation=QuantSpec(bits=8, symmetric=False, granularity=PerToken(), dynamic=True),
        include=("model.layers",),
    )
    quantize_(student, config, step="prepare")
    return student


def batch(args, device):
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=g)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    labels[:, : args.seq // 2] = -100  # the "prompt" half carries no loss
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
    }, labels.to(device)


def causal_ce(logits, labels):
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def cached_config(pd_every: int | None) -> dict:
    """The terms a cached teacher serves: task, top-k kd, qk_entropy, rounding (and pd)."""
    terms = {
        "task": {"weight": 1.0},
        "kd": {"weight": 1.0, "temperature": 2.0},
        "qk_entropy": {"weight": 0.01},
        "rounding": {"weight": 1.0e-4},
    }
    if pd_every is not None:
        terms["pd"] = {"weight": 0.1, "every": pd_every}
    return {"terms": terms}


def objective_config(with_pd: bool, pd_every: int = 1) -> dict:
    terms = {
        "task": {"weight": 1.0},
        "kd": {"weight": 1.0, "temperature": 2.0},
        "feat": {
            "weight": 0.5,
            "student_layers": ["model.layers.*"],
            "teacher_layers": ["model.layers.*"],
        },
        "qk_entropy": {"weight": 0.01},
        "rounding": {"weight": 1.0e-4},
    }
    if with_pd:
        terms["pd"] = {"weight": 0.1, "every": pd_every}
    return {"terms": terms}


class Runner:
    """One mode: its own student copy and optimizer, a ``step()`` closure."""

    def __init__(self, name, args, teacher, base_student, inputs, labels):
        from distiq.objective import QuantDistillObjective

        self.name = name
        self.inputs, self.labels = inputs, labels
        self.teacher = teacher
        self.student = copy.deepcopy(base_student)
        self.objective = None
        self.step_index = 0
        if name not in ("fp_finetune", "teacher_forward"):
            quantize_student(self.student)
        self.teacher_topk = None
        if name.startswith("qad_cached"):  # the teacher's top-k, computed once (the cache)
            from distiq.distill.sparse import teacher_topk

            config = cached_config(4 if name.endswith("pd_every4") else None)
            with torch.no_grad():
                logits = teacher(**inputs).logits
            self.teacher_topk = teacher_topk(logits, 16, temperature=2.0)
        elif name.startswith("qad"):  # the full step: teacher + fake-quant student + objective
            config = objective_config(
                with_pd=name != "qad_no_pd", pd_every=4 if name == "qad_pd_every4" else 1
            )
        if name.startswith("qad"):
            self.objective = QuantDistillObjective(config).to(inputs["input_ids"].device)
            self.objective.attach(student=self.student, teacher=teacher)
        if name == "objective_terms":
            self._init_terms_only(inputs)
        params = list(self.student.parameters())
        if self.objective is not None:
            params += list(self.objective.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)

    def _init_terms_only(self, inputs):
        """The objective alone: task, kd, feat and rounding on precomputed tensors (gradients
        flow to leaf copies of the student's logits / hidden states and to its weights)."""
        from distiq.distill import FeatureCapture
        from distiq.objective import QuantDistillObjective

        terms = objective_config(with_pd=False)["terms"]
        feat = {k: v for k, v in terms["feat"].items() if not k.endswith("_layers")}
        config = {
            "terms": {
                "task": terms["task"],
                "kd": terms["kd"],
                "feat": feat,
                "rounding": terms["rounding"],
            }
        }
        self.objective = QuantDistillObjective(config).attach(student=self.student)
        with torch.no_grad():
            with FeatureCapture(self.teacher, "model.layers.*") as cap:
                self.teacher_logits = self.teacher(**inputs).logits
                self.teacher_feats = cap.features()
            with FeatureCapture(self.student, "model.layers.*") as cap:
                self.student_logits = self.student(**inputs).logits
                self.student_feats = cap.features()

    def step(self):
        if self.name == "teacher_forward":
            with torch.no_grad():
                return self.teacher(**self.inputs).logits
        if self.name == "objective_terms":
            out = self.objective(
                step=self.step_index,
                student_logits=self.student_logits.detach().requires_grad_(),
                teacher_logits=self.teacher_logits,
                labels=self.labels,
                attention_mask=self.inputs["attention_mask"],
                student_features=[f.detach().requires_grad_() for f in self.student_feats],
                teacher_features=self.teacher_feats,
            )
            out.total.backward()
            self.student.zero_grad(set_to_none=True)
            return out.total
        if self.objective is None:
            logits = self.student(**self.inputs).logits
            loss = causal_ce(logits, self.labels)
        else:
            teacher = {"teacher_topk": self.teacher_topk}
            if self.teacher_topk is None:
                with torch.no_grad():
                    teacher = {"teacher_logits": self.teacher(**self.inputs).logits}
            logits = self.student(**self.inputs).logits
            out = self.objective(
                step=self.step_index,
                student_logits=logits,
                labels=self.labels,
                attention_mask=self.inputs["attention_mask"],
                student_inputs=self.inputs,
                **teacher,
            )
            loss = out.total
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_index += 1
        return loss


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_step(runner, device):
    sync(device)
    start = time.perf_counter()
    runner.step()
    sync(device)
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.vocab, args.seq, args.batch = 64, 2, 256, 32, 4
        args.steps, args.repeats, args.warmup = 4, 2, 1
        if args.out == RESULTS:
            args.out = RESULTS.with_name("objective_overhead_quick.json")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    teacher, student = build_models(args, device)
    inputs, labels = batch(args, device)
    modes = [
        "fp_finetune",
        "qat_task",
        "qad_no_pd",
        "qad_full",
        "qad_pd_every4",
        "qad_cached",
        "qad_cached_pd_every4",
        "teacher_forward",
        "objective_terms",
    ]
    runners = [Runner(m, args, teacher, student, inputs, labels) for m in modes]
    for runner in runners:
        for _ in range(args.warmup):
            runner.step()
    # round robin, one step per mode at a time, so that load drift hits every mode alike; the
    # mean over a repeat's steps (a multiple of 4: pd.every 4 runs its extra forward once in
    # four steps), then the median over repeats
    blocks = {m: [] for m in modes}
    for _ in range(args.repeats):
        times = {m: [] for m in modes}
        for _ in range(args.steps):
            for runner in runners:
                times[runner.name].append(time_step(runner, device))
        for m in modes:
            blocks[m].append(statistics.fmean(times[m]))
    medians = {m: statistics.median(v) for m, v in blocks.items()}
    base = medians["fp_finetune"]
    rows = [
        {
            "mode": m,
            "median_step_ms": round(1000 * medians[m], 2),
            "ratio_vs_fp_finetune": round(medians[m] / base, 3),
            "repeat_means_ms": [round(1000 * t, 2) for t in blocks[m]],
        }
        for m in modes
    ]
    print(f"{'mode':<16}{'step ms':>10}{'x fp':>8}")
    for row in rows:
        print(f"{row['mode']:<16}{row['median_step_ms']:>10.1f}{row['ratio_vs_fp_finetune']:>8.2f}")
    result = {
        "benchmark": "objective_overhead",
        "machine": machine_info(),
        "device": str(device),
        "sizes": {
            k: getattr(args, k) for k in ("hidden", "layers", "heads", "vocab", "seq", "batch")
        },
        "steps_per_repeat": args.steps,
        "repeats": args.repeats,
        "goal": "a QAD step <= 1.6x fp_finetune (qad_cached against qat_task: the cost of the "
        "objective once the teacher is cached)",
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {os.path.relpath(args.out)}")


if __name__ == "__main__":
    main()
