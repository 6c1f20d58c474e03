"""The report's sections about accuracy: the frontier (the main figure), the results of each task
and metric grouped over seeds with their paired comparisons, and the ablation of the objective.
Each function returns blocks (:mod:`distiq.report.blocks`) and, for the frontier, the PNGs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from distiq.report import latency, plots, stats
from distiq.report.ablation import ablation_table, ablations
from distiq.report.blocks import Block, Bullets, Heading, Image, Paragraph, TableBlock
from distiq.report.compare import Comparison, setting_comparisons
from distiq.report.frontier import frontier, frontier_table, smallest_table
from distiq.report.group_tables import comparison_table, group_table, mixed_table
from distiq.report.groups import MIN_SEEDS, Group, teacher_group
from distiq.report.predictions import QuestionScores
from distiq.report.tables import blind_baseline, fmt_number, results_table
from distiq.results import ResultRecord

MetricGroups = Mapping[tuple[str, str], list[Group]]

STATISTICS = (
    "Accuracy is the mean over a group's seeds ± their sample standard deviation (divisor "
    f'n − 1); a group is one method at one setting and variant, and "seeds" counts its runs '
    f"(marked when fewer than {MIN_SEEDS}). Two groups are compared on the same test questions: "
    "each question's score is averaged over a group's seeds, and the difference A − B is tested "
    "with the exact McNemar test on per-question correctness (one run per side, scores 0 or 1) "
    "or a paired sign-flip permutation test on the per-question differences (otherwise); its "
    f"{100 * stats.INTERVAL_LEVEL:.0f} % interval is a bootstrap over questions "
    f"({stats.BOOTSTRAP_RESAMPLES:,} resamples, seeded). A difference with p ≥ {stats.ALPHA:g} "
    "is a tie. The test asks whether a difference would hold on other questions for the seeds "
    "that were run; how much it moves with the seed is the standard deviation beside it."
)


def frontier_blocks(by_metric: MetricGroups) -> tuple[list[Block], dict[str, bytes]]:
    """The main figure per task and metric, the groups on its lines and the smallest model
    that keeps each share of the teacher's accuracy."""
    blocks: list[Block] = [Heading("Accuracy vs size: the frontier")]
    images: dict[str, bytes] = {}
    for index, ((task, metric), groups) in enumerate(by_metric.items()):
        png = plots.accuracy_vs_size(groups)
        if png is None:
            continue
        name = "accuracy_vs_size.png" if index == 0 else f"accuracy_vs_size_{index}.png"
        images[name] = png
        if len(by_metric) > 1:
            blocks.append(Heading(f"{task} ({metric})", 3))
        blocks.append(Image(name, f"accuracy vs size, the frontier: {task} ({metric})"))
        front = frontier(groups)
        teacher = teacher_group(groups, task, metric)
        teacher_mean = None if teacher is None else teacher.mean
        blocks.append(
            Paragraph(
                "One line per method family (PTQ: rtn, gptq; QAT: qat; QAD: qad and the "
                "distilled students) through its best group at each size, error bars ± the "
                "standard deviation over seeds; hollow markers are the family's other groups, "
                "the star the teacher. Follow a line to the left to find the smallest model "
                "that keeps a given accuracy."
            )
        )
        blocks.append(TableBlock(frontier_table(front, teacher_mean)))
        smallest = smallest_table(front, teacher_mean)
        if smallest is not None:
            blocks.append(
                Paragraph(
                    "The smallest model of each family whose mean keeps a share of the "
                    "teacher's accuracy (size, accuracy):"
                )
            )
            blocks.append(TableBlock(smallest))
    if not images:
        blocks.append(Paragraph("Not drawn: no record has both size and accuracy."))
    return blocks, images


def _notes(records: list[ResultRecord], teacher: Group | None) -> str:
    notes = []
    if teacher is not None:
        names = ", ".join(r.name for r in teacher.records)
        notes.append(
            f"Teacher accuracy: {fmt_number(teacher.mean)} (record {names}); retention is each "
            "group's mean divided by the teacher's."
        )
    else:
        notes.append("No teacher record: retention cannot be computed.")
    blind = blind_baseline(records)
    if blind is not None:
        notes.append(f"Blind-question baseline (question only, no image): {blind:.2f}.")
    return " ".join(notes)


def _comparison_blocks(comparisons: list[Comparison]) -> list[Block]:
    blocks: list[Block] = [Heading("Paired comparisons", 3)]
    if not comparisons:
        return [*blocks, Paragraph("No two groups share a setting: nothing is compared.")]
    blocks.append(
        Paragraph(
            "Every pair of groups at the same setting, on the questions every run of both "
            f"answered. A − B in points with its {100 * stats.INTERVAL_LEVEL:.0f} % interval; "
            f"'tie' when p ≥ {stats.ALPHA:g} (the verdict follows the test, which the interval "
            "can disagree with near the threshold)."
        )
    )
    blocks.append(TableBlock(comparison_table(comparisons)))
    notes = list(dict.fromkeys(note for c in comparisons for note in c.notes))
    untested = sum(not c.tested for c in comparisons)
    if untested:
        notes.append(
            f"{untested} comparison(s) not tested: a run without predictions.jsonl (evaluated "
            "before distiq kept each question's answer); `distiq eval RUN_DIR` writes it."
        )
    if notes:
        blocks.append(Bullets(notes))
    return blocks


def results_blocks(
    task: str,
    metric: str,
    records: list[ResultRecord],
    groups: list[Group],
    predictions: Mapping[str, QuestionScores],
) -> list[Block]:
    """The results of one task and metric: the table of groups, the latency notes, the paired
    comparisons, the mixed-precision allocations and every run."""
    main = [g for g in groups if g.key.ablation is None]
    teacher = teacher_group(groups, task, metric)
    blocks: list[Block] = [
        Heading(f"Results: {task} ({metric})"),
        Paragraph(_notes(records, teacher)),
        Paragraph(STATISTICS),
        TableBlock(group_table(main, teacher, latency.teacher_of(records))),
    ]
    blocks += [Paragraph(note) for note in latency.latency_notes(records)]
    blocks += _comparison_blocks(setting_comparisons(main, predictions))
    mixed = mixed_table(main)
    if mixed is not None:
        blocks += [Heading("Mixed precision", 3), TableBlock(mixed)]
    blocks += [
        Heading("Every run", 3),
        Paragraph("Each run (seed) on its own; the table above groups them."),
        TableBlock(results_table(records)),
    ]
    return blocks


def ablation_blocks(
    groups: Sequence[Group], predictions: Mapping[str, QuestionScores]
) -> list[Block]:
    """The ablation tables (none when no record carries ``extra["ablation"]``)."""
    found = ablations(groups, predictions)
    if not found:
        return []
    blocks: list[Block] = [
        Heading("Ablation of the objective"),
        Paragraph(
            "Runs trained with a subset of the objective's terms (task loss, logit KD, feature "
            "KD, attention alignment, prediction difference, Q/K entropy, rounding regulariser) "
            "or the full objective, each row with its seeds, tested against the row above and "
            f"against the task loss alone on the same questions ('tie' when p ≥ {stats.ALPHA:g})."
        ),
    ]
    for ablation in found:
        blocks += [Heading(ablation.title, 3), TableBlock(ablation_table(ablation))]
        notes = list(
            dict.fromkeys(
                note
                for row in ablation.rows
                for c in (row.vs_previous, row.vs_task)
                if c is not None
                for note in (c.notes or ((f"not tested: {c.reason}",) if not c.tested else ()))
            )
        )
        if notes:
            blocks.append(Bullets(notes))
    return blocks
