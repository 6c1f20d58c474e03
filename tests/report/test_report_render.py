"""distiq.report.render: Markdown and self-contained HTML from records and run metrics."""

import base64
import io
import re
from pathlib import Path

import pytest
from PIL import Image

import distiq.report
from distiq.report import (
    KeepsTeacherAccuracy,
    ReportInputs,
    Setting,
    check_writable,
    collect_inputs,
    plots,
    render,
    write_report,
)
from distiq.report.inputs import read_curves
from distiq.results import ResultRecord, with_retention


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, fixtures):
    root = fixtures.write_demo_dir(tmp_path_factory.mktemp("demo"))
    return render(collect_inputs([root]))


def _inputs(records, curves=()):
    return ReportInputs(records=with_retention(records), curves=list(curves), sources=[])


def _rows(markdown, header):
    """The rows of the Markdown table whose header line starts with ``header``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("| "):
            break
        rows.append(line)
    return rows


def test_markdown_tables(rendered):
    md = rendered.markdown
    groups = _rows(md, "| method | variant |")
    assert [row.split(" | ")[0][2:] for row in groups] == [
        "teacher",
        "kd",
        "rtn",
        "gptq",
        "qat",
        "qad",
        "gptq",
        "qad",
    ]  # teacher and full precision first, then falling bits, baselines before qad
    assert groups[0] == (
        "| teacher | — | 16/16 | — | 4.40 | 92.00 | 1 | 100.0 % | 3.00 | ort-fp32, 2 threads "
        "| reference |"
    )
    assert groups[1] == (
        "| kd | — | 16/16 | — | 2.00 | 88.00 | 1 (\\< 3) | 95.7 % | 2.00 | ort-fp32, 2 threads "
        "| 1.50× (faster) |"
    )
    assert "| rtn | — | 4/8 | 64 | 0.70 | 80.00 | 1 (\\< 3) | 87.0 % | — | — | — |" in groups
    # deployed on ort-int4, which the teacher was not timed on: compared on ort-fp32, and said so
    assert (
        "| qad | — | 4/8 | 64 | 0.70 | 91.50 | 1 (\\< 3) | 99.5 % | 3.75 | ort-int4, 2 threads "
        "| 1.20× (faster, on ort-fp32) |" in groups
    )
    assert "| 4.00 | ort-fp32, 2 threads | 0.75× (slower) |" in md
    # every run, its seed last
    runs = _rows(md, "| name | method |")
    assert runs[0].endswith("| ort-fp32, 2 threads | reference | — |")
    assert "| rtn-w4a8 | rtn | 4/8 | 64 | 0.70 | 80.00 | 87.0 % | — | — | — | — |" in runs
    assert (
        "Slower than the teacher on the same backend: qad-w2a16 (ort-fp32, 2 threads: 4.00 ms vs "
        "3.00 ms, 0.75×)." in md
    )
    assert (
        "As deployed, slower than the teacher on ort-fp32, 2 threads (3.00 ms): qad-w4a8 on "
        "ort-int4, 2 threads (3.75 ms)." in md
    )
    assert "| name | threads | pytorch-fp32 ms | ort-fp32 ms | ort-int4 ms |" in md
    assert "| qad-w4a8 | 2 | — | 2.50 (1.20×) | 3.75 |" in md
    assert "| teacher | 2 | 9.00 | 3.00 | — |" in md
    assert "Blind-question baseline (question only, no image): 48.25." in md
    assert "6 of 6 goals met." in md
    # per question type: the nested form (%) and the flat VQAAccuracy form (fractions)
    assert "| name | bits W/A | colour | count |" in md
    assert "| teacher | 16/16 | 95.0 | 90.0 |" in md
    assert "| qad-w4a8 | 4/8 | 93.8 | 87.5 |" in md
    assert "| blind baseline (question only) | — | 20.0 | 30.0 |" in md
    assert "- cpu: Test CPU, cores: 2, torch: 2.13.0 — teacher, qad-w4a8" in md


def test_paired_comparisons_and_the_frontier_tables(rendered):
    md = rendered.markdown
    comparisons = _rows(md, "| setting | A | B |")
    assert [row.split(" | ")[:3] for row in comparisons] == [
        ["| W16A16", "kd (1 seed)", "teacher (1 seed)"],
        ["| W4A8 g64", "qad (1 seed)", "rtn (1 seed)"],
        ["| W4A8 g64", "qad (1 seed)", "gptq (1 seed)"],
        ["| W4A8 g64", "qad (1 seed)", "qat (1 seed)"],
        ["| W4A8 g64", "qat (1 seed)", "rtn (1 seed)"],
        ["| W4A8 g64", "qat (1 seed)", "gptq (1 seed)"],
        ["| W4A8 g64", "gptq (1 seed)", "rtn (1 seed)"],
        ["| W2A16 g64", "qad (1 seed)", "gptq (1 seed)"],
    ]
    # nested answers: qad right on 10 more of 400 questions than qat, McNemar p = 2 / 2^10
    assert comparisons[3].endswith("| 0.002 | exact McNemar | 400 | qad W4A8 g64 better |")
    assert "A difference with p ≥ 0.05 is a tie." in md
    frontier = _rows(md, "| family | size MB |")
    assert frontier[0] == "| PTQ | 0.40 | gptq W2A16 g64 | 60.00 | 1 (\\< 3) | 65.2 % |"
    assert frontier[-1] == "| QAD | 2.00 | kd W16A16 | 88.00 | 1 (\\< 3) | 95.7 % |"
    smallest = _rows(md, "| keeps ≥ |")
    assert smallest[0] == (
        "| 99 % | — | — | qad W4A8 g64 (0.70 MB, 91.50) | qad W4A8 g64 (0.70 MB, 91.50) |"
    )


def test_seeds_ties_ablation_and_mixed_precision(tmp_path, fixtures):
    fixtures.write_seeded_dir(tmp_path / "seeded", questions=600)
    inputs = collect_inputs([tmp_path / "seeded"])
    out = render(inputs)
    md = out.markdown
    assert next(iter(out.images)) == "accuracy_vs_size.png"  # the frontier is the main figure
    assert md.index("![accuracy vs size, the frontier") < md.index("## Results")
    groups = _rows(md, "| method | variant |")
    assert len(groups) == 21  # teacher + 19 groups + mixed; the 8 ablation groups are apart
    assert all(" ± " in row for row in groups[1:])
    assert "| qad | — | mixed | budget 0.60 MB | 0.59 |" in md
    assert "| qad mixed (budget 0.60 MB) | 0.60 | 0.59 | vision: 8, language_model: 4, " in md
    comparisons = _rows(md, "| setting | A | B |")
    assert any(row.endswith(" | tie |") for row in comparisons)  # tenths of a point tie
    assert any(row.endswith(" better |") for row in comparisons)
    assert all(c.split(" | ")[5] == "sign-flip permutation, exact" for c in comparisons)
    assert "## Ablation of the objective" in md
    ablation = _rows(md, "| terms | adds |")
    assert [row.split(" | ")[1] for row in ablation] == [
        "task loss only",
        "+ logit KD",
        "+ feature KD",
        "+ attention alignment",
        "+ prediction difference",
        "+ Q/K entropy",
        "+ rounding regulariser",
        "full objective",
    ]
    assert len(_rows(md, "| name | method |")) == len(inputs.records)
    # a tie in a goal is rendered plainly: its own class, no highlight
    statuses = [row.rsplit(" | ", 1)[1][:-2] for row in _rows(md, "| goal | measured |")]
    assert statuses == ["met", "tie", "tie", "tie", "met", "**NOT MET**"]
    assert out.html.count('class="tie"') == statuses.count("tie")
    assert render(inputs).html == out.html  # seeded resampling: the same report every time


def test_markdown_links_every_image_and_html_embeds_them(rendered):
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", rendered.markdown)
    assert (
        linked
        == list(rendered.images)
        == [
            "accuracy_vs_size.png",
            "accuracy_vs_latency.png",
            "curves_qad-w4a8.png",
            "curves_rtn-w4a8.png",
        ]
    )
    page = rendered.html
    assert "http://" not in page and "https://" not in page  # nothing fetched from elsewhere
    embedded = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([^"]+)">', page)
    assert [base64.b64decode(data) for data in embedded] == list(rendered.images.values())
    sizes = {name: Image.open(io.BytesIO(png)).size for name, png in rendered.images.items()}
    assert sizes["accuracy_vs_size.png"] == (900, 600)
    assert sizes["curves_qad-w4a8.png"] == (990, 520)  # 5 panels: 3 columns x 2 rows
    assert sizes["curves_rtn-w4a8.png"] == (990, 520)


def test_curve_panels_drop_non_finite_points(tmp_path, fixtures):
    path = fixtures.write_metrics(
        tmp_path / "metrics.jsonl", fixtures.metrics_lines(steps=4, nan_at=2)
    )
    panels = plots.curve_panels(read_curves(path))
    assert [title for title, _, _ in panels] == [
        "total loss",
        "term: task",
        "term: kd",
        "term: rounding (1 non-finite)",
        "val: vqa_accuracy",
    ]
    assert panels[3][1] == [1, 3, 4] and panels[4][1:] == ([3], [pytest.approx(0.53)])
    empty = fixtures.write_metrics(
        tmp_path / "e" / "metrics.jsonl", [{"kind": "train", "step": 1, "total": "nan"}]
    )
    assert plots.curve_panels(read_curves(empty)) == []
    assert plots.training_curves(read_curves(empty)) is None


def test_escaping_losses_and_missing_data_are_explained():
    records = [
        ResultRecord("teacher", "teacher", value=90.0),
        ResultRecord("<b>qad|x</b> & $y$", "qad", 4, 8, 64, value=50.0),
        ResultRecord("rtn", "rtn", 4, 8, 64, value=70.0),
    ]
    out = render(_inputs(records))
    assert out.images == {}
    assert "&lt;b&gt;qad|x&lt;/b&gt; &amp; $y$" in out.html and "<b>qad" not in out.html
    # Markdown shows the name as written: no tag, no entity, no math
    assert "| \\<b\\>qad\\|x\\</b\\> \\& \\$y\\$ | qad |" in out.markdown
    assert "| **NOT MET** |" in out.markdown  # qad keeps too little: shown, not hidden
    assert out.html.count('class="not-met"') == 1 and out.html.count('class="met"') == 0
    # no predictions.jsonl: nothing is tested, and the report says why
    assert "not tested: no predictions.jsonl for \\<b\\>qad" in out.markdown
    assert "1 comparison(s) not tested: a run without predictions.jsonl" in out.markdown
    assert "Not drawn: no record has both size and accuracy." in out.markdown
    assert "Not drawn: no record has both latency and accuracy." in out.markdown
    assert "No run metrics (metrics.jsonl) were found." in out.markdown
    assert "do not say which machine" in out.markdown
    assert "Accuracy per question type" not in out.markdown
    assert "Blind-question baseline" not in out.markdown
    assert "Latency per backend" not in out.markdown and "Speed vs teacher" not in out.markdown
    assert "0 of 6 goals met, 1 not met, 5 not measured." in out.markdown


def test_goals_are_the_callers():
    records = [
        ResultRecord("teacher", "teacher", value=90.0),
        ResultRecord("qad", "qad", 4, 8, 64, value=89.5),
    ]
    goals = [KeepsTeacherAccuracy("qad", Setting(4, 8), min_retention_percent=99.0)]
    md = render(_inputs(records), goals).markdown
    assert "## Goals\n\n1 of 1 goals met." in md
    assert "| W4A8: qad keeps ≥ 99 % of the teacher's VQA accuracy |" in md
    assert "| W4A8: qad beats" not in md
    assert "## Goals" not in render(_inputs(records), goals=[]).markdown


def test_report_text_names_the_product_only(rendered):
    """Nothing in the report code or in a rendered report refers to how it was developed."""
    words = re.compile(r"\bissues?\b|§|\bsessions?\b", re.IGNORECASE)
    package = Path(distiq.report.__file__).parent
    for path in sorted(package.glob("*.py")):
        found = words.findall(path.read_text(encoding="utf-8"))
        assert not found, (path.name, found)
    assert not words.findall(rendered.markdown) and not words.findall(rendered.html)


def test_blind_baseline_as_a_number():
    records = [ResultRecord("teacher", "teacher", value=90.0, extra={"blind_baseline": 41.0})]
    assert (
        "Blind-question baseline (question only, no image): 41.00."
        in render(_inputs(records)).markdown
    )


def test_machine_from_bench_extra():
    bench = {"machine": {"cpu": "EPYC", "cores": 2}, "threads": 2, "ort-int8": {}}
    records = [
        ResultRecord("a", "qad", 4, 8, extra={"bench": bench}),
        ResultRecord("b", "rtn", 4, 8, extra={"bench": bench}),
        ResultRecord("c", "rtn", 2, 16, extra={"machine": "laptop"}),
    ]
    md = render(_inputs(records)).markdown
    assert "- cpu: EPYC, cores: 2, threads: 2 — a, b\n- laptop — c" in md


def test_no_records_and_no_teacher():
    assert "No result records were found" in render(_inputs([])).markdown
    md = render(_inputs([ResultRecord("rtn", "rtn", 4, 8, value=70.0)])).markdown
    assert "No teacher record: retention cannot be computed." in md
    assert "| rtn | rtn | 4/8 | per-channel | — | 70.00 | — | — | — | — | — |" in md
    assert "| rtn | — | 4/8 | per-channel | — | 70.00 | 1 (\\< 3) | — | — | — | — |" in md


def test_rendering_is_deterministic():
    records = [ResultRecord("teacher", "teacher", value=90.0, size_mb=1.0)]
    first, second = render(_inputs(records)), render(_inputs(records))
    assert first.images == second.images and first.html == second.html


def test_write_report_is_atomic(tmp_path, fixtures, monkeypatch):
    records = [ResultRecord("teacher", "teacher", value=90.0)]
    files = write_report(_inputs(records), tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert set(before) == {"report.md", "report.html"} and files.images == []

    def broken(run):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(plots, "training_curves", broken)
    run = read_curves(
        fixtures.write_metrics(tmp_path / "r" / "metrics.jsonl", fixtures.metrics_lines(2))
    )
    with pytest.raises(RuntimeError, match="drawing failed"):
        write_report(_inputs(records, [run]), tmp_path / "out")
    after = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert after == before  # the earlier report is intact, no temporary files are left


def test_check_writable(tmp_path):
    file = tmp_path / "file.txt"
    file.write_text("x")
    with pytest.raises(NotADirectoryError, match="it is a file"):
        check_writable(file)
    with pytest.raises(NotADirectoryError, match="cannot write the report to"):
        check_writable(file / "sub")
    with pytest.raises(OSError, match="choose a writable directory with --out"):
        check_writable("/proc/distiq-report-test")
    assert check_writable(tmp_path / "new" / "dir").is_dir()
    assert list((tmp_path / "new" / "dir").iterdir()) == []  # the write check leaves nothing


def test_qlora_merge_requantize_drop_is_shown():
    records = [
        ResultRecord("teacher", "teacher", value=90.0),
        ResultRecord(
            "qlora-kd-nf4",
            "qlora-kd",
            4,
            16,
            64,
            value=86.5,
            extra={"qlora_unmerged_value": 88.0, "merge_requantize_drop": 1.5},
        ),
        ResultRecord("rtn", "rtn", 4, 8, 64, value=70.0),
    ]
    markdown = render(_inputs(records)).markdown
    assert "## Merging adapters and re-quantizing" in markdown
    assert "| qlora-kd-nf4 | 4/16 | 88.00 | 86.50 | 1.50 |" in markdown
    assert "Merging adapters" not in render(_inputs(records[::2])).markdown
