"""distiq.report.groups and .compare: records grouped over seeds (mean ± sample std), and two
groups compared on the same questions (McNemar, sign-flip, bootstrap interval, tie)."""

import itertools
import statistics
from pathlib import Path

import numpy as np
import pytest

from distiq.report import stats
from distiq.report.compare import compare, fmt_p, setting_comparisons
from distiq.report.groups import MIN_SEEDS, fmt_mean_std, fmt_seeds, group_records, key_of
from distiq.report.predictions import QuestionScores
from distiq.results import ResultRecord


def _scores(values):
    return {q: float(v) for q, v in enumerate(values)}


def _run(name, method, values, w=4, a=8, seed=None, **extra):
    """A record whose value is its scores' mean, and its QuestionScores."""
    scores = _scores(values)
    value = 100 * sum(scores.values()) / len(scores)
    record = ResultRecord(name, method, w, a, value=value, seed=seed, extra=extra)
    return record, QuestionScores(name, Path("mem"), scores)


def _groups_and_predictions(*runs):
    records = [r for r, _ in runs]
    return group_records(records), {r.name: s for r, s in runs}


def test_groups_over_seeds_mean_and_sample_std():
    values = [89.4, 90.1, 89.9]
    records = [
        ResultRecord(f"qad-s{s}", "qad", 4, 8, 64, value=v, seed=s) for s, v in enumerate(values)
    ]
    records += [
        ResultRecord("qad-hd", "qad", 4, 8, 64, value=80.0, seed=0, extra={"variant": "half-depth"}),
        ResultRecord("qad-abl", "qad", 4, 8, 64, value=81.0, seed=0, extra={"ablation": "task"}),
        ResultRecord("teacher", "teacher", value=90.0),
        ResultRecord("rtn", "rtn", 4, 8, 64, value=85.0, seed=0),
    ]  # fmt: skip
    groups = {(g.method, g.key.variant, g.key.ablation): g for g in group_records(records)}
    qad = groups[("qad", None, None)]
    assert [r.name for r in qad.records] == ["qad-s0", "qad-s1", "qad-s2"]
    assert qad.n == 3 and qad.seeds == [0, 1, 2]
    assert qad.mean == pytest.approx(np.mean(values))
    assert (
        qad.std == pytest.approx(np.std(values, ddof=1)) == pytest.approx(statistics.stdev(values))
    )
    assert fmt_mean_std(qad) == "89.80 ± 0.36" and fmt_seeds(qad) == "3"
    half = groups[("qad", "half-depth", None)]
    assert half.std is None and fmt_mean_std(half) == "80.00"
    assert (
        fmt_seeds(half) == f"1 (< {MIN_SEEDS})"
        and fmt_seeds(groups[("teacher", None, None)]) == "1"
    )
    assert half.label == "qad W4A8 g64 half-depth" and half.bits_label == "W4A8 g64"
    assert groups[("qad", None, "task")].records[0].name == "qad-abl"
    # teacher first, then by setting and method
    assert [g.label for g in group_records(records)][:2] == ["teacher", "rtn W4A8 g64"]


def test_mixed_precision_records_group_by_budget():
    extra = {"bits_allocation": {"vision": 8, "language_model": 4}, "size_budget_mb": 0.6}
    a = ResultRecord("m0", "qad", 4, 8, value=89.0, seed=0, extra=extra)
    b = ResultRecord("m1", "qad", 3, 8, 64, value=89.2, seed=1, extra=extra)  # nominal bits differ
    c = ResultRecord("m2", "qad", 4, 8, value=88.0, extra={**extra, "size_budget_mb": 0.5})
    groups = group_records([a, b, c])
    assert [len(g.records) for g in groups] == [2, 1]
    assert key_of(a) == key_of(b) and key_of(a).mixed and key_of(a).w_bits is None
    assert groups[0].label == "qad mixed (budget 0.60 MB)"
    assert groups[0].allocation == {"vision": 8, "language_model": 4}


def test_one_binary_run_each_is_exact_mcnemar():
    # 20 questions: both right on 0-9; only A right on 10; only B right on 11-18; both wrong on 19
    a_values = [1] * 10 + [1] + [0] * 8 + [0]
    b_values = [1] * 10 + [0] + [1] * 8 + [0]
    groups, predictions = _groups_and_predictions(
        _run("a", "qad", a_values), _run("b", "gptq", b_values)
    )
    gptq, qad = groups
    result = compare(qad, gptq, predictions)
    assert result.test == "exact McNemar" and result.questions == 20
    assert result.p_value == 20 / 512  # b = 1, c = 8 by hand
    assert result.difference == pytest.approx(100 * (1 - 8) / 20)
    low, high = result.interval
    assert low < result.difference < high < 0
    assert not result.tie and result.verdict == "gptq W4A8 better"
    assert result.numbers() == (
        f"-35.00 points [95 % CI {low:+.2f}, {high:+.2f}], p = 0.0391 (exact McNemar, 20 questions)"
    )


def test_tie_when_the_test_cannot_tell():
    a_values = [1] * 10 + [1, 1] + [0] * 8
    b_values = [1] * 10 + [0, 0] + [1] * 8  # b = 2, c = 8: p = 0.109
    groups, predictions = _groups_and_predictions(
        _run("a", "qad", a_values), _run("b", "qat", b_values)
    )
    result = compare(groups[1], groups[0], predictions)
    assert result.p_value == 112 / 1024 >= stats.ALPHA
    assert result.tie and result.verdict == "tie"
    assert result.difference == pytest.approx(-30.0)


def test_seeds_are_pooled_per_question_and_tested_by_sign_flips():
    rng = np.random.default_rng(0)
    a_runs = [rng.random(12) < 0.7 for _ in range(2)]
    b_runs = [rng.random(12) < 0.5 for _ in range(2)]
    runs = [_run(f"a{i}", "qad", v, seed=i) for i, v in enumerate(a_runs)]
    runs += [_run(f"b{i}", "rtn", v, seed=i) for i, v in enumerate(b_runs)]
    groups, predictions = _groups_and_predictions(*runs)
    rtn, qad = groups
    result = compare(qad, rtn, predictions)
    d = np.mean(a_runs, axis=0) - np.mean(b_runs, axis=0)  # per question, over seeds
    assert result.test == "sign-flip permutation, exact"
    assert result.difference == pytest.approx(100 * d.mean())
    assert result.difference == pytest.approx(qad.mean - rtn.mean)
    nonzero = d[d != 0]
    patterns = list(itertools.product((-1, 1), repeat=nonzero.size))
    extreme = sum(abs(np.dot(s, np.abs(nonzero))) >= abs(nonzero.sum()) - 1e-12 for s in patterns)
    assert result.p_value == pytest.approx(extreme / len(patterns))


def test_vqa_scores_between_0_and_1_use_sign_flips():
    a = [1.0, 0.6, 0.3, 1.0, 0.9, 0.0, 1.0, 1.0]
    b = [1.0, 0.3, 0.3, 0.6, 0.9, 0.3, 1.0, 0.0]
    groups, predictions = _groups_and_predictions(_run("a", "qad", a), _run("b", "rtn", b))
    result = compare(groups[1], groups[0], predictions)
    assert result.test == "sign-flip permutation, exact"
    assert result.p_value == pytest.approx(stats.sign_flip_test(np.subtract(a, b)).p_value)


def test_untested_and_disagreeing_inputs_are_said():
    groups, predictions = _groups_and_predictions(
        _run("a", "qad", [1, 0, 1, 1]), _run("b", "rtn", [1, 0, 0, 0])
    )
    rtn, qad = groups
    result = compare(qad, rtn, {"a": predictions["a"]})
    assert not result.tested and result.verdict == "not tested"
    assert result.reason == "no predictions.jsonl for b" and result.difference == pytest.approx(
        50.0
    )
    assert result.numbers() == "+50.00 points; not tested: no predictions.jsonl for b"
    # b answered one more question, and its record says something else than its answers
    longer = QuestionScores("b", Path("mem"), {**predictions["b"].scores, 99: 1.0})
    off = {"a": predictions["a"], "b": longer}
    result = compare(qad, rtn, off)
    assert result.questions == 4
    assert result.notes == (
        "compared on the 4 questions every run answered (some runs answered up to 5)",
        "b: its predictions.jsonl scores 40.00 and its record 25.00; they come from different "
        "evaluations",
    )
    disjoint = {"a": predictions["a"], "b": QuestionScores("b", Path("m"), {"x": 1.0})}
    assert compare(qad, rtn, disjoint).reason == "the runs answered no question in common"


def test_which_groups_are_compared():
    runs = [
        _run("qad", "qad", [1, 1, 0, 1]),
        _run("gptq", "gptq", [1, 0, 0, 1]),
        _run("rtn", "rtn", [0, 1, 0, 1]),
        _run("qad-hd", "qad", [1, 0, 0, 0], variant="half-depth"),
        _run("gptq-hd", "gptq", [0, 0, 0, 0], variant="half-depth"),
        _run("qad-w2", "qad", [1, 0, 1, 0], w=2, a=16),
        _run("abl", "qad", [1, 1, 1, 1], ablation="task"),
    ]
    groups, predictions = _groups_and_predictions(*runs)
    pairs = [(c.a.label, c.b.label) for c in setting_comparisons(groups, predictions)]
    assert pairs == [
        ("qad W4A8 half-depth", "gptq W4A8 half-depth"),  # the same variant
        ("qad W4A8 half-depth", "qad W4A8"),  # the same method
        ("qad W4A8", "rtn W4A8"),
        ("qad W4A8", "gptq W4A8"),
        ("gptq W4A8 half-depth", "gptq W4A8"),
        ("gptq W4A8", "rtn W4A8"),
    ]  # never across settings, never an ablation, never another method's other variant


def test_fmt_p():
    cases = (None, 0.5, 0.448123, 0.05, 0.0499, 0.049996, 0.0012, 0.00001)
    assert [fmt_p(p) for p in cases] == [
        "—",
        "0.5",
        "0.448",
        "0.05",
        "0.0499",
        "< 0.05",  # never rounded up to the threshold it is below
        "0.0012",
        "< 0.0001",
    ]


def test_dense_groups_are_compared_by_their_means_and_say_why_not_tested():
    records = [
        ResultRecord(f"{m}-s{s}", m, 4, 8, task="segmentation", metric="miou", value=v, seed=s)
        for m, values in (("qad", (90.5, 90.9)), ("qat", (91.1, 91.7)))
        for s, v in enumerate(values)
    ]
    qad, qat = sorted(group_records(records), key=lambda g: g.key.method)
    result = compare(qad, qat, {})
    assert not result.tested and result.difference == pytest.approx(-0.7)
    assert result.reason == "segmentation scores the whole split, not question by question"
