"""distiq.report.goals: goals the caller passes (the demo's by default), decided from the numbers,
losses shown."""

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
from distiq.results import ResultRecord


def _records(**values):
    """Teacher at 90 and the given ``{name: value}`` for names like ``qad_w4a8``."""
    settings = {"w4a8": (4, 8, 64), "w2a16": (2, 16, 64), "w2a16g128": (2, 16, 128)}
    out = [ResultRecord("teacher", "teacher", value=90.0)]
    for key, value in values.items():
        method, setting = key.split("_")
        w, a, g = settings[setting]
        out.append(ResultRecord(key, method, w, a, g, value=value))
    return out


def _status(checks):
    return [c.status for c in checks]


def test_all_goals_met(fixtures):
    checks = check_goals(fixtures.demo_records())
    assert _status(checks) == ["met"] * 6
    assert checks[0].value == pytest.approx(100 * 91.5 / 92)
    assert checks[5].value == pytest.approx(25.0) and checks[5].target == WIDE_MARGIN
    assert goals_summary(checks) == "6 of 6 goals met."


def test_losses_are_reported_with_their_numbers():
    checks = check_goals(
        _records(
            qad_w4a8=89.0,
            rtn_w4a8=70.0,
            gptq_w4a8=89.5,
            qat_w4a8=89.0,
            qad_w2a16=80.0,
            gptq_w2a16=75.0,
        )
    )
    # 89/90 = 98.9 % < 99 %; qad loses to gptq; a tie with qat is not a win; 5 points is not wide
    assert _status(checks) == ["not met", "met", "not met", "not met", "not met", "not met"]
    assert checks[0].value == pytest.approx(100 * 89 / 90)
    assert "98.89 % retained" in checks[0].measured
    assert "gptq_w4a8: 89.50" in checks[2].measured and "-0.50 points" in checks[2].measured
    assert checks[4].status == "not met" and checks[4].value == pytest.approx(100 * 80 / 90)
    assert checks[5].value == pytest.approx(5.0)
    assert goals_summary(checks) == "1 of 6 goals met, 5 not met."


def test_wide_margin_boundary():
    at = check_goals(_records(qad_w2a16=70.0, gptq_w2a16=70.0 - WIDE_MARGIN))[5]
    below = check_goals(_records(qad_w2a16=70.0, gptq_w2a16=70.0 - WIDE_MARGIN + 0.01))[5]
    assert (at.status, below.status) == ("met", "not met")


def test_missing_records_are_not_measured_never_met():
    checks = check_goals(_records(qad_w4a8=89.5, qad_w2a16g128=85.0, gptq_w2a16g128=50.0))
    assert _status(checks) == ["met"] + ["not measured"] * 5
    assert "no rtn W4A8 record" in checks[1].measured
    # W2A16 requires group 64: group-128 records do not count
    assert "no qad W2A16, group 64" in checks[4].measured
    no_teacher = check_goals([r for r in _records(qad_w4a8=89.5) if r.method != "teacher"])
    assert no_teacher[0].status == "not measured" and "no teacher" in no_teacher[0].measured
    assert goals_summary(check_goals([])) == "0 of 6 goals met, 6 not measured."


def test_best_record_per_method_and_other_metrics_ignored():
    records = [
        *_records(qad_w4a8=80.0, rtn_w4a8=85.0),
        ResultRecord("qad-efqat", "qad", 4, 8, None, value=89.2),  # per-channel variant
        ResultRecord("rtn-seed1", "rtn", 4, 8, 64, value=88.0),
        ResultRecord("qad-det", "qad", 4, 8, 64, task="detection", metric="map", value=99.0),
    ]
    check = check_goals(records)[1]
    assert check.status == "met" and check.value == pytest.approx(89.2 - 88.0)
    assert "qad-efqat" in check.measured and "rtn-seed1" in check.measured


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
        ResultRecord("kd-a", "kd", task="detection", metric="map", value=38.0),
        ResultRecord("kd-b", "kd", task="detection", metric="map", value=39.0),
        ResultRecord("rtn-8", "rtn", 8, 8, task="detection", metric="map", value=37.0),
        ResultRecord("vqa-kd", "kd", value=99.0),  # another task: never counted
    ]
    fp = Setting(16, 16)
    goals = [
        KeepsTeacherAccuracy("kd", fp, min_retention_percent=97.0, task="detection", metric="map"),
        BeatsBaseline("kd", "rtn", fp, task="detection", metric="map"),
        BeatsBaseline(
            "kd", "qat", Setting(8, 8), min_margin_points=1.0, task="detection", metric="map"
        ),
    ]
    checks = check_goals(records, goals)
    assert [c.goal for c in checks] == [
        "W16A16: kd keeps ≥ 97 % of the teacher's map",
        "W16A16: kd beats rtn",
        "W8A8: kd beats qat by ≥ 1 points",
    ]
    assert checks[0].status == "met" and checks[0].value == pytest.approx(97.5)
    assert "kd-b: 39.00 vs the teacher (t): 40.00" in checks[0].measured  # the best kd record
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
