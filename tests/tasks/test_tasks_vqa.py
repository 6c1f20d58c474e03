"""VQA: official answer normalisation rule by rule, the official scores of generated cases,
leave-one-out accuracy, aggregation, loss."""

import itertools
import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distiq.tasks._vqa_tables import CONTRACTIONS
from distiq.tasks.vqa import (
    VQAAccuracy,
    VQATask,
    answer_token_loss,
    answer_token_mask,
    infer_answer_type,
    normalize_answer,
    process_punctuation,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # whitespace: newlines and tabs become spaces, ends stripped, runs collapsed by split/join
        ("  yes\n", "yes"),
        ("red\tball", "red ball"),
        ("red   ball", "red ball"),
        # case
        ("YES", "yes"),
        # a mark touching a space is deleted; elsewhere it becomes a space
        ("yes , sir", "yes sir"),
        ("red,blue", "red blue"),
        ("red/blue", "red blue"),
        ("left (mostly)", "left mostly"),
        ("red:blue", "red:blue"),  # ':' and "'" are not in the official list
        ("it's", "it's"),
        ('"hello"', "hello"),
        ("what?", "what"),
        ("a=b+c", "b c"),  # '=' and '+' become spaces, then the article "a" goes
        ("foo_bar", "foo bar"),
        ("x;y:z", "x y:z"),
        ("{x}", "x"),
        ("back\\slash", "back slash"),
        ("<tag>", "tag"),
        ("user@host", "user host"),
        ("`tick`", "tick"),
        ("[1]", "1"),
        # a comma between digits deletes the comma, and then every other mark too
        ("1,000", "1000"),
        ("1,000/2", "10002"),
        ("1,000 (approx)", "1000 approx"),
        # periods are dropped unless a digit follows
        ("yes.", "yes"),
        ("e.g.", "eg"),
        ("3.5", "3.5"),
        (".5", ".5"),
        ("5.", "5"),
        # '!' and '-' are in the official list
        ("Yes!", "yes"),
        ("yes !", "yes"),
        ("t-shirt", "t shirt"),
        ("well-known - yes", "wellknown yes"),  # " - " touches a space: every '-' is deleted
        # marks the official list leaves alone
        ("#1", "#1"),
        ("50%", "50%"),
        # number words up to ten, and "none" -> 0
        ("two", "2"),
        ("Ten", "10"),
        ("none", "0"),
        ("zero", "0"),
        ("eleven", "eleven"),
        ("two dogs", "2 dogs"),
        # articles
        ("a dog", "dog"),
        ("an apple", "apple"),
        ("The Cat", "cat"),
        ("another", "another"),
        # contractions (the official table)
        ("dont", "don't"),
        ("cant", "can't"),
        ("whats", "what's"),
        ("Im", "im"),  # capitalised keys in the table never match after lower-casing
        ("don't", "don't"),  # the apostrophe is not punctuation
        ("don’t", "don’t"),  # nor is the typographic one, and it is no key of the table
        # digits: the official script (Python 2) knows ASCII digits only
        ("\u0663.\u0665", "\u0663\u0665"),  # Arabic-Indic 3.5: the period goes
        ("3,\u0665", "3 \u0665"),  # no comma between two (ASCII) digits
    ],
)
def test_normalize_answer_rules(raw, expected):
    assert normalize_answer(raw) == expected


def test_punctuation_step_alone_keeps_case():
    assert process_punctuation("Yes, Sir.") == "Yes Sir"
    assert process_punctuation("A/B") == "A B"


def test_period_strip_stops_after_32_like_the_official_code():
    # vqaEval.py passes re.UNICODE (= 32) as the `count` argument of re.sub.
    assert normalize_answer("." * 33 + "x") == ".x"
    assert normalize_answer("." * 32 + "x") == "x"


def test_contraction_table_is_the_official_one():
    assert len(CONTRACTIONS) == 120
    assert CONTRACTIONS["somebody'd"] == "somebodyd"
    assert CONTRACTIONS["couldn'tve"] == "couldn't've"
    assert not any("’" in k or "’" in v for k, v in CONTRACTIONS.items())  # ASCII apostrophes


def test_all_answers_are_normalised_when_the_humans_disagree():
    # the prediction and every human answer get the punctuation and the word steps
    humans = ["yes", "yes", "Yes!", "Yes!", "yes", "yes", "yes", "yes", "yes", "yes"]
    assert vqa_accuracy("Yes!", humans) == 1.0
    assert vqa_accuracy("yes", ["Yes."] * 3 + ["no"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("2", ["two"] * 5 + ["2"] * 5) == 1.0
    assert vqa_accuracy("two", ["Two"] * 2 + ["three"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("a dog", ["The dog"] + ["cat"] * 9) == pytest.approx(0.3)


def test_nothing_is_normalised_when_the_humans_agree():
    # official quirk: identical human answers skip every normalisation, the prediction's too
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    assert vqa_accuracy("Yes.", ["yes"] * 10) == 0.0
    assert vqa_accuracy("yes", ["yes."] * 10) == 0.0
    assert vqa_accuracy("2", ["two"] * 10) == 0.0
    assert vqa_accuracy("two", ["two"] * 10) == 1.0
    # ... but whitespace is stripped (and newlines / tabs become spaces) before comparing
    assert vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0
    assert vqa_accuracy("yes", [" yes", "yes\t"] * 5) == 1.0  # identical once stripped
    assert vqa_accuracy("red ball", ["red\tball"] * 10) == 1.0
    assert vqa_accuracy("red  ball", ["red ball"] * 10) == 0.0  # inner runs of spaces stay


def test_clean_lowercase_answers_score_as_exact_match_counts():
    # what the demo's synthetic answers are: normalisation never changes them
    for word in ("yes", "no", "2", "red", "square", "circle"):
        assert normalize_answer(word) == word
        assert vqa_accuracy(word, [word] * 10) == 1.0
        assert vqa_accuracy(word, [word] * 2 + ["other"] * 8) == pytest.approx(0.6)
        assert vqa_accuracy("other", [word] * 10) == 0.0


OFFICIAL_CASES = Path(__file__).parent / "data" / "vqa_official_cases.json"


def test_equals_the_official_evaluation_on_generated_cases():
    # scores recorded by running GT-Vision-Lab/VQA's vqaEval.py (scripts/vqa_official_cases.py)
    fixture = json.loads(OFFICIAL_CASES.read_text(encoding="utf-8"))
    cases = fixture["cases"]
    assert len(cases) >= 300
    wrong = [
        (case["prediction"], case["human_answers"], case["accuracy"], got)
        for case in cases
        if (got := vqa_accuracy(case["prediction"], case["human_answers"])) != case["accuracy"]
    ]
    assert not wrong, f"{len(wrong)} cases differ from the official scores, e.g. {wrong[:3]}"
    assert all(round(100 * c["accuracy"], 2) == c["reported"] for c in cases)
    # the aggregate tables: overall, per question type, per answer type (official: 2 decimals)
    metric = VQAAccuracy()
    metric.update(
        [c["prediction"] for c in cases],
        {
            "answers": [c["human_answers"] for c in cases],
            "question_type": [c["question_type"] for c in cases],
            "answer_type": [c["answer_type"] for c in cases],
        },
    )
    out = metric.compute()
    assert round(100 * out["vqa_accuracy"], 2) == fixture["overall"]
    for kind in ("question_type", "answer_type"):
        for type_, value in fixture[f"per_{kind}"].items():
            assert round(100 * out[f"vqa_accuracy/{kind}/{type_}"], 2) == value


@pytest.mark.parametrize(
    ("matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]
)
def test_leave_one_out_accuracy(matches, expected):
    humans = ["cat"] * matches + [f"other{i}" for i in range(10 - matches)]
    assert vqa_accuracy("cat", humans) == pytest.approx(expected)
    # normalised only when the humans disagree (all ten "cat": compared as they are)
    assert vqa_accuracy("The cat.", humans) == (0.0 if matches == 10 else pytest.approx(expected))


def test_leave_one_out_against_explicit_subsets():
    rng = random.Random(0)
    for _ in range(200):
        humans = [rng.choice(["red", "blue", "2", "two"]) for _ in range(10)]
        prediction = rng.choice(["red", "blue", "2", "green"])
        if len(set(humans)) > 1:  # "two" counts as "2" then
            humans = [normalize_answer(h) for h in humans]
        subsets = itertools.combinations(range(10), 9)
        expected = sum(min(1.0, sum(humans[j] == prediction for j in s) / 3) for s in subsets) / 10
        assert vqa_accuracy(prediction, humans) == pytest.approx(expected, abs=1e-12)


def test_single_human_answer_is_normalised_exact_match():
    assert vqa_accuracy("two", ["Two."]) == 1.0
    assert vqa_accuracy("a red car", ["The red car"]) == 1.0
    assert vqa_accuracy("blue", ["red"]) == 0.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="empty"):
        vqa_accuracy("yes", [])
    with pytest.raises(TypeError, match="list of answer strings"):
        vqa_accuracy("yes", "yes")
    with pytest.raises(TypeError):
        vqa_accuracy(None, ["yes"] * 10)


def test_accumulator_per_question_and_answer_type():
    acc = VQAAccuracy()
    acc.update(
        ["yes", "3", "red"],
        {
            "answers": [["yes"] * 10, ["3"] * 2 + ["4"] * 8, ["blue"] * 10],
            "question_type": ["exist", "count", "color"],
        },
    )
    other = VQAAccuracy()
    other.update(["no"], {"answers": [["no"] * 10], "question_type": ["exist"]})
    acc.merge(other)
    out = acc.compute()
    assert out["vqa_accuracy"] == pytest.approx((1 + 0.6 + 0 + 1) / 4)
    assert out["num_questions"] == 4
    assert out["vqa_accuracy/question_type/exist"] == 1.0
    assert out["vqa_accuracy/question_type/count"] == pytest.approx(0.6)
    assert out["vqa_accuracy/answer_type/yes/no"] == 1.0
    assert out["vqa_accuracy/answer_type/number"] == pytest.approx(0.6)
    assert out["vqa_accuracy/answer_type/other"] == 0.0
    acc.reset()
    with pytest.raises(ValueError, match="update"):
        acc.compute()


def test_merged_shards_give_the_one_pass_value_in_any_order():
    # a data-parallel evaluation merges shards in rank order, not question order: the
    # accuracy must not depend on it (plain sum() of 0.3/0.6/0.9 scores would, in the last bit)
    humans = [["x"] * k + ["y"] * (10 - k) for k in range(10)]
    answers = [humans[(7 * i) % 10] for i in range(200)]
    whole, shards = VQAAccuracy(), [VQAAccuracy() for _ in range(2)]
    whole.update(["x"] * 200, {"answers": answers})
    for rank, shard in enumerate(shards):
        shard.update(["x"] * len(answers[rank::2]), {"answers": answers[rank::2]})
    merged = VQAAccuracy()
    for shard in shards:
        merged.merge(shard)
    assert sum(merged.scores) != sum(whole.scores)  # the orders differ in the last bit
    assert merged.compute() == whole.compute()


def test_infer_answer_type():
    assert infer_answer_type(["Yes"] * 6 + ["no"] * 4) == "yes/no"
    assert infer_answer_type(["two"] * 10) == "number"
    assert infer_answer_type(["red"] * 10) == "other"


def test_answer_token_loss_matches_reference_and_ignores_prompt():
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 6, 0]])
    # reference: token t+1 predicted from logits at t, mean over answer tokens
    terms = [
        -F.log_softmax(logits[b, t - 1], -1)[labels[b, t]]
        for b in range(2)
        for t in range(1, 5)
        if labels[b, t] != -100
    ]
    expected = torch.stack(terms).mean()
    assert torch.allclose(answer_token_loss(logits, labels), expected.float(), atol=1e-6)
    mask = answer_token_mask(labels)
    assert mask.tolist() == [[False, True, True, False, False], [True, True, True, True, False]]
    changed = logits.clone()
    changed[0, 0] += 100.0  # position 0 of sample 0 predicts a prompt token: no effect
    assert torch.allclose(answer_token_loss(changed, labels), answer_token_loss(logits, labels))
    with pytest.raises(ValueError, match="no answer token"):
        answer_token_loss(logits, torch.full_like(labels, -100))


def test_vqa_task_interface():
    task = VQATask()
    logits = torch.randn(2, 5, 7, requires_grad=True)
    batch = {"labels": torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 6, 0]])}
    out = task.loss({"logits": logits}, batch)
    assert torch.equal(out.total, sum(out.terms.values()))
    assert out.stats["answer_tokens"] == 6
    out.total.backward()
    view = task.distill_view(logits, batch)
    assert view["distributions"]["answer_tokens"]["mask"].sum() == 6
    assert view["regressions"] == {}
    assert task.predict(["yes", "2"]) == ["yes", "2"]
    with pytest.raises(TypeError, match="decode"):
        task.predict(logits)
    with pytest.raises(KeyError, match="labels"):
        task.loss(logits, {})
