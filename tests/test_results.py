"""distiq.results: records round trip, merge by name, retention."""

import json

import pytest

from distiq.config import ConfigError
from distiq.results import ResultRecord, read_records, upsert_records, with_retention, write_records


def test_records_round_trip_and_merge(tmp_path):
    path = tmp_path / "results.json"
    teacher = ResultRecord(name="teacher", method="teacher", value=92.0, params=1000, steps=10)
    qad = ResultRecord(name="qad-w4a8", method="qad", w_bits=4, a_bits=8, value=90.0, group_size=64)
    write_records(path, [teacher, qad])
    assert read_records(path) == [teacher, qad]
    merged = upsert_records(
        path,
        [
            ResultRecord(
                name="qad-w4a8",
                method="qad",
                w_bits=4,
                a_bits=8,
                latency_ms=1.5,
                latency_backend="onnxruntime-int8",
                extra={"peak_mb": 3.0},
            ),
            ResultRecord(name="rtn-w4a8", method="rtn", w_bits=4, a_bits=8, value=60.0),
        ],
    )
    assert [r.name for r in merged] == ["teacher", "qad-w4a8", "rtn-w4a8"]
    qad_merged = merged[1]
    assert qad_merged.value == 90.0 and qad_merged.latency_ms == 1.5 and qad_merged.group_size == 64
    assert qad_merged.extra == {"peak_mb": 3.0}
    assert read_records(path) == merged
    retained = {r.name: r.retention for r in with_retention(merged)}
    assert retained["teacher"] == 1.0
    assert retained["qad-w4a8"] == pytest.approx(90 / 92)


def test_bad_results_files_are_clear_errors(tmp_path):
    path = tmp_path / "results.json"
    assert read_records(path) == []
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_records(path)
    path.write_text(json.dumps([{"name": "x", "method": "qadd", "value": 150}]))
    with pytest.raises(ConfigError) as info:
        read_records(path)
    assert "did you mean 'qad'" in str(info.value)
