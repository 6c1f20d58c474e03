"""distiq.report.goals: goals the caller passes (the demo's by default), decided from the means
over seeds and the paired test on the same questions: met, tie, not met, not measured."""

from pathlib import Path

import pytest

from distiq.report import (
    DEFAULT_GOALS,
    BeatsBaseline,
    KeepsTeacherAccuracy,
    Setting,
    check_goals,
    goals_summary,
)
from distiq.report.goals import WIDE_MARGIN
from distiq.report.predictions import QuestionScores
from distiq.results import ResultRecord

N = 1000  # questions
SETTINGS = {"w4a8": (4, 8, 64), "w2a16": (2, 16, 64), "w2a16g128": (2, 16, 128)}


def _scores(right: int, wrong_first: int = 0) -> dict[int, float]:
    """``right`` questions right out of N: questions ``wrong_first .. wrong_first + right``."""
    return {q: float(wrong_first <= q < wrong_first + right) for q in range(N)}


def _world(**values):
    """A teacher at 90 and ``{name: value}`` for names like ``qad_w4a8``, each run's scores
    nested (the first value*N/100 questions right); returns (records, predictions)."""
    records = [ResultRecord("teacher", "teacher", value=90.0)]
    for key, value in values.items():
        method, setting = key.split("_")
        w, a, g = SETTINGS[setting]
        records.append(ResultRecord(key, method, w, a, g, value=value))
    predictions = {
        r.name: QuestionScores(r.name, Path("mem"), _scores(round(r.value * N / 100)))
        for r in records
    }
    return records, predictions


def _status(checks):
    return [c.status for c in checks]


def test_all_goals_met(fixtures, tmp_path):
    from distiq.report import collect_inputs

    inputs = collect_inputs([fixtures.write_demo_dir(tmp_path / "demo")])
    checks = check_goals(inputs.records, DEFAULT_GOALS, inputs.predictions)
    assert _status(checks) == ["met"] * 6
    assert checks[0].value == pytest.approx(100 * 91.5 / 92)
    assert checks[5].value == pytest.approx(25.0) and checks[5].target == WIDE_MARGIN
    # qad-w4a8 right on 366 of 400 questions, qat-w4a8 on 356 (a subset): McNemar b=10, c=0
    assert checks[3].p_value == pytest.approx(2 / 2**10)
    assert "exact McNemar, 400 questions" in checks[3].measured
    assert goals_summary(checks) == "6 of 6 goals met."


def test_wins_ties_and_losses_are_told_apart():
    records, predictions = _world(
        qad_w4a8=89.0, rtn_w4a8=70.0, gptq_w4a8=92.0, qat_w4a8=89.3, qad_w2a16=80.0, gptq_w2a16=75.0
    )
    checks = check_goals(records, DEFAULT_GOALS, predictions)
    # 89/90 = 98.9 % < 99 %; beats rtn; gptq significantly better; 0.3 points over 3 discordant
    # questions is a tie; 5 points is significant but short of the 10-point margin
    assert _status(checks) == ["not met", "met", "not met", "tie", "not met", "not met"]
    assert "98.89 % retained" in checks[0].measured
    assert checks[2].value == pytest.approx(-3.0) and checks[2].p_value < 1e-8
    assert checks[3].value == pytest.approx(-0.3)
    assert checks[3].p_value == pytest.approx(0.25)  # b=0, c=3: 2 * (1/8)
    assert (
        "qat_w4a8: 89.30" in checks[3].measured and "p = 0.25 (exact McNemar" in checks[3].measured
    )
    assert checks[5].value == pytest.approx(5.0) and checks[5].p_value < 1e-8
    assert goals_summary(checks) == "1 of 6 goals met, 1 tie, 4 not met."


def test_a_tie_by_hand_computed_mcnemar():
    """qad right where gptq is wrong on b questions, gptq right where qad is wrong on c."""

    def world(b, c):
        qad = {q: float(q < 800 or 800 <= q < 800 + b) for q in range(N)}
        gptq = {q: float(q < 800 or 900 <= q < 900 + c) for q in range(N)}
        records = [
            ResultRecord("qad", "qad", 4, 8, value=100 * sum(qad.values()) / N),
            ResultRecord("gptq", "gptq", 4, 8, value=100 * sum(gptq.values()) / N),
        ]
        scores = {"qad": qad, "gptq": gptq}
        return records, {k: QuestionScores(k, Path("mem"), v) for k, v in scores.items()}

    goal = [BeatsBaseline("qad", "gptq", Setting(4, 8))]
    # b = 8, c = 2: p = 2 (1 + 10 + 45) / 1024 = 0.109 -> a tie, though qad is 0.6 points up
    check = check_goals(*world(8, 2)[:1], goal, world(8, 2)[1])[0]
    assert check.status == "tie" and check.value == pytest.approx(0.6)
    assert check.p_value == 112 / 1024
    # b = 8, c = 1: p = 2 (1 + 9) / 512 = 0.039 -> met
    check = check_goals(world(8, 1)[0], goal, world(8, 1)[1])[0]
    assert check.status == "met" and check.p_value == 20 / 512
    assert goals_summary([check]) == "1 of 1 goals met."


def test_without_predictions_a_comparison_is_not_measured():
    records, _ = _world(qad_w4a8=89.5, rtn_w4a8=70.0)
    checks = check_goals(records)
    assert checks[0].status == "met"  # retention needs no per-question answers
    assert checks[1].status == "not measured"
    assert "not tested: no predictions.jsonl for qad_w4a8, rtn_w4a8" in checks[1].measured
    assert "+19.50 points" in checks[1].measured  # the means, for information


def test_missing_records_are_not_measured_never_met():
    records, predictions = _world(qad_w4a8=89.5, qad_w2a16g128=85.0, gptq_w2a16g128=50.0)
    checks = check_goals(records, DEFAULT_GOALS, predictions)
    assert _status(checks) == ["met"] + ["not measured"] * 5
    assert "no rtn W4A8 record" in checks[1].measured
    # W2A16 requires group 64: group-128 records do not count
    assert "no qad W2A16, group 64" in checks[4].measured
    no_teacher = check_goals([r for r in records if r.method != "teacher"])
    assert no_teacher[0].status == "not measured" and "no teacher" in no_teacher[0].measured
    assert goals_summary(check_goals([])) == "0 of 6 goals met, 6 not measured."


def test_means_over_seeds_and_the_best_group_of_a_setting():
    teacher = ResultRecord("teacher", "teacher", value=90.0)
    seeds = [
        ResultRecord(f"qad-s{s}", "qad", 4, 8, 64, value=v, seed=s)
        for s, v in enumerate([88, 90, 92])
    ]
    other = ResultRecord("qad-pc", "qad", 4, 8, None, value=89.9)  # per-channel: another group
    check = check_goals(
        [teacher, *seeds, other], [KeepsTeacherAccuracy("qad", Setting(4, 8), 99.5)]
    )[0]
    # the g64 group's mean (90) beats the per-channel group (89.9): 100 % retained
    assert check.status == "met" and check.value == pytest.approx(100.0)
    assert check.measured == (
        "qad W4A8 g64 (3 seeds): 90.00 ± 2.00 vs the teacher (teacher: 90.00) → 100.00 % retained"
    )
    # the best seed alone (92) is not what counts: the mean over seeds is
    low = check_goals([teacher, *seeds], [KeepsTeacherAccuracy("qad", Setting(4, 8, 64), 100.5)])
    assert low[0].status == "not met"


def test_variants_ablations_and_mixed_precision_are_their_own_groups():
    records = [
        ResultRecord("teacher", "teacher", value=90.0),
        ResultRecord("qad", "qad", 4, 8, value=80.0),
        ResultRecord("qad-lf", "qad", 4, 8, value=89.9, extra={"variant": "label-free"}),
        ResultRecord("qad-abl", "qad", 4, 8, value=95.0, extra={"ablation": "task+kd"}),
        ResultRecord(
            "qad-mixed", "qad", 4, 8, value=96.0,
            extra={"bits_allocation": {"vision": 8}, "size_budget_mb": 1.0},
        ),
    ]  # fmt: skip
    plain = KeepsTeacherAccuracy("qad", Setting(4, 8), 99.0)
    label_free = KeepsTeacherAccuracy("qad", Setting(4, 8), 99.0, variant="label-free")
    checks = check_goals(records, [plain, label_free])
    assert [c.value for c in checks] == [
        pytest.approx(100 * 80 / 90),
        pytest.approx(99.888, abs=1e-3),
    ]
    assert _status(checks) == ["not met", "met"]
    assert (
        label_free.describe() == "W4A8: qad (label-free) keeps ≥ 99 % of the teacher's VQA accuracy"
    )


def test_seeded_groups_use_the_sign_flip_test():
    teacher = ResultRecord("teacher", "teacher", value=90.0)
    records, predictions = [teacher], {}
    for seed in range(3):
        for method, right in (("qad", 900 + seed), ("rtn", 860 - seed)):
            name = f"{method}-s{seed}"
            records.append(ResultRecord(name, method, 4, 8, 64, value=right / 10, seed=seed))
            predictions[name] = QuestionScores(name, Path("mem"), _scores(right, wrong_first=seed))
    check = check_goals(records, [BeatsBaseline("qad", "rtn", Setting(4, 8))], predictions)[0]
    assert check.status == "met" and check.value == pytest.approx(4.2)
    assert (
        "qad W4A8 g64 (3 seeds): 90.10 ± 0.10 vs rtn W4A8 g64 (3 seeds): 85.90 ± 0.10"
        in check.measured
    )
    assert "sign-flip permutation, exact, 1,000 questions" in check.measured


def test_wide_margin_boundary():
    at = check_goals(*_pair(70.0, 70.0 - WIDE_MARGIN))[5]
    below = check_goals(*_pair(70.0, 70.0 - WIDE_MARGIN + 0.1))[5]
    assert (at.status, below.status) == ("met", "not met")


def _pair(qad, gptq):
    records, predictions = _world(qad_w2a16=qad, gptq_w2a16=gptq)
    return records, DEFAULT_GOALS, predictions


def test_default_goals_in_words():
    assert [g.describe() for g in DEFAULT_GOALS] == [
        "W4A8: qad keeps ≥ 99 % of the teacher's VQA accuracy",
        "W4A8: qad beats rtn",
        "W4A8: qad beats gptq",
        "W4A8: qad beats qat",
        "W2A16, group 64: qad keeps ≥ 90 % of the teacher's VQA accuracy",
        f"W2A16, group 64: qad beats gptq by ≥ {WIDE_MARGIN:g} points",
    ]
    assert check_goals([]) == check_goals([], DEFAULT_GOALS)


def test_goals_of_the_caller_any_method_task_and_metric():
    records = [
        ResultRecord("t", "teacher", task="detection", metric="map", value=40.0),
        ResultRecord("kd-a", "kd", task="detection", metric="map", value=38.0, seed=0),
        ResultRecord("kd-b", "kd", task="detection", metric="map", value=39.0, seed=1),
        ResultRecord("rtn-8", "rtn", 8, 8, task="detection", metric="map", value=37.0),
        ResultRecord("vqa-kd", "kd", value=99.0),  # another task: never counted
    ]
    fp = Setting(16, 16)
    goals = [
        KeepsTeacherAccuracy("kd", fp, min_retention_percent=95.0, task="detection", metric="map"),
        BeatsBaseline("kd", "rtn", fp, task="detection", metric="map"),
        BeatsBaseline(
            "kd", "qat", Setting(8, 8), min_margin_points=1.0, task="detection", metric="map"
        ),
    ]
    checks = check_goals(records, goals)
    assert [c.goal for c in checks] == [
        "W16A16: kd keeps ≥ 95 % of the teacher's map",
        "W16A16: kd beats rtn",
        "W8A8: kd beats qat by ≥ 1 points",
    ]
    assert checks[0].status == "met" and checks[0].value == pytest.approx(96.25)
    assert "kd W16A16 (2 seeds): 38.50 ± 0.71 vs the teacher (t: 40.00)" in checks[0].measured
    assert checks[1].measured == "no rtn W16A16 record with map"  # rtn-8 is W8A8
    assert checks[2].measured == "no kd W8A8 and no qat W8A8 record with map"
    assert goals_summary(checks) == "1 of 3 goals met, 2 not measured."


def test_bad_goals_are_clear_errors():
    with pytest.raises(
        TypeError, match=r"goals\[1\] is a str, not a goal; pass KeepsTeacherAccuracy"
    ):
        check_goals([], [DEFAULT_GOALS[0], "qad beats gptq"])
    with pytest.raises(ValueError, match="min_retention_percent must be a finite number"):
        KeepsTeacherAccuracy("qad", Setting(4, 8), min_retention_percent=float("nan"))
    with pytest.raises(ValueError, match="BeatsBaseline.min_margin_points must be ≥ 0, got -1"):
        BeatsBaseline("qad", "gptq", Setting(4, 8), min_margin_points=-1)
