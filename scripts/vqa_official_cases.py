"""Record the official VQA evaluation's scores of generated answers, as a test fixture.

The official evaluation is ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` of the
GT-Vision-Lab/VQA repository. It is Python 2 code, so this script (Python 3) writes the generated
cases to a temporary file and runs a small driver under a Python 2.7 interpreter that imports the
official file from where it lies, scores every case with ``VQAEval.evaluate`` and records, per
case, the unrounded accuracy (the value ``evaluate`` passes to ``setEvalQA``) and the reported,
rounded one (``evalQA``), plus the overall and per-type numbers (``accuracy``). Nothing of the
official file is copied into the fixture or the repository: only its scores.

The cases are randomised (seeded) variations of VQA-like answers: mixed case, punctuation inside,
around and beside spaces, digits with commas and decimal points, runs of periods, number words,
articles, contractions with and without apostrophes, newlines / tabs / other whitespace,
non-ASCII letters and digits, and human answers that agree exactly, agree only after stripping,
or disagree in every proportion (two to twelve human answers per question).

Regenerate the fixture (from the repository root)::

    git clone https://github.com/GT-Vision-Lab/VQA /tmp/VQA
    python scripts/vqa_official_cases.py /tmp/VQA/PythonEvaluationTools/vqaEvaluation/vqaEval.py \\
        --python2 ~/.pyenv/versions/2.7.18/bin/python

Options: ``--cases N`` (default 600), ``--seed S`` (default 0), ``--out PATH`` (default
``tests/tasks/data/vqa_official_cases.json``). ``tests/tasks/test_tasks_vqa.py`` then checks that
``distiq.tasks.vqa.vqa_accuracy`` gives the recorded official value on every case.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

# Runs under Python 2.7: argv = folder of vqaEval.py, cases JSON, output JSON.
_DRIVER = r"""
import io, json, os, sys
sys.path.insert(0, sys.argv[1])
from vqaEval import VQAEval

cases = json.load(io.open(sys.argv[2], encoding="utf-8"))


class Store(object):
    def __init__(self, qa):
        self.qa = qa

    def getQuesIds(self):
        return sorted(self.qa)


gts, res = {}, {}
for i, case in enumerate(cases):
    answers = [
        {"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
        for j, a in enumerate(case["human_answers"])
    ]
    gts[i] = {"question_type": case["question_type"], "answer_type": case["answer_type"],
              "answers": answers}
    res[i] = {"answer": case["prediction"]}

unrounded = {}


class Recording(VQAEval):
    def setEvalQA(self, quesId, acc):
        unrounded[quesId] = acc
        VQAEval.setEvalQA(self, quesId, acc)


evaluation = Recording(Store(gts), Store(res))
stdout, sys.stdout = sys.stdout, open(os.devnull, "w")  # its progress bar
evaluation.evaluate()
sys.stdout = stdout
json.dump({
    "accuracy": [unrounded[i] for i in range(len(cases))],
    "reported": [evaluation.evalQA[i] for i in range(len(cases))],
    "overall": evaluation.accuracy["overall"],
    "per_question_type": evaluation.accuracy["perQuestionType"],
    "per_answer_type": evaluation.accuracy["perAnswerType"],
    "interpreter": sys.version.split()[0],
}, open(sys.argv[3], "w"))
"""

YES_NO = ["yes", "no"]
NUMBERS = ["0", "1", "2", "3", "4", "7", "10", "11", "12", "100", "1,000", "3.5", ".5", "2.0"]
NUMBER_WORDS = ["none", "zero", "one", "two", "three", "four", "ten", "eleven", "twenty"]
WORDS = [
    "red", "blue", "white", "cat", "dog", "frisbee", "tennis racket", "t-shirt", "hot dog",
    "left", "right", "nothing", "skiing", "fire hydrant", "black and white", "red/blue",
    "e.g. a cat", "u.s.a.", "mr. smith", "3:00", "10:30 pm", "50%", "$5", "#1", "a&w",
    "it's", "its", "don't", "dont", "cant", "can't", "whats", "what's", "im", "Im", "ive",
    "oclock", "o'clock", "yall", "y'all", "let's", "somebody'd", "hes", "he's", "wont",
    "a dog", "the cat", "an apple", "two dogs", "the", "a", "an apple a day",
    "café", "niño", "Ünïcode", "straße", "Москва", "αβγ", "٣", "٣,٥", "3,٥", "٣.٥",
]  # fmt: skip
OFFICIAL_MARKS = list(';/[]"{}()=+\\_-><@`,?!')  # the marks the official list treats
MARKS = OFFICIAL_MARKS * 2 + list(":'.#$%&*~|^")
SPACES = [" ", "  ", "\n", "\t", "\r", "\xa0", "\u3000", "\u2009", "\x0b"]
QUESTION_TYPES = ["what color is the", "how many", "is the", "what is", "are there"]
ANSWER_TYPES = ["yes/no", "number", "other"]


def base_answer(rng: random.Random) -> str:
    pool = rng.choice([YES_NO, NUMBERS, NUMBER_WORDS, WORDS, WORDS])
    return rng.choice(pool)


def perturb(rng: random.Random, text: str) -> str:
    """One random change of the kind real answers show."""
    kind = rng.randrange(12)
    if kind == 0:
        return rng.choice([text.upper(), text.title(), text.capitalize()])
    if kind == 1:
        return "".join(c.upper() if rng.random() < 0.3 else c for c in text)
    if kind == 2:  # a mark at the end, as in "Yes!" / "yes." / "two?"
        return text + rng.choice(MARKS)
    if kind == 3:  # a mark inside, at a random position
        at = rng.randint(0, len(text))
        return text[:at] + rng.choice(MARKS) + text[at:]
    if kind == 4:  # a mark beside a space
        mark = rng.choice(MARKS)
        return rng.choice([f"{text} {mark}", f"{mark} {text}", f"{text} {mark} sir"])
    if kind == 5:  # wrapped
        left, right = rng.choice([('"', '"'), ("(", ")"), ("[", "]"), ("'", "'"), ("`", "`")])
        return left + text + right
    if kind == 6:  # whitespace at the ends or inside
        at = rng.randint(0, len(text))
        where = rng.randrange(3)
        space = rng.choice(SPACES)
        if where == 0:
            return space + text
        if where == 1:
            return text + space
        return text[:at] + space + text[at:]
    if kind == 7:  # an article
        return rng.choice(["a ", "an ", "the ", "The ", "A "]) + text
    if kind == 8:  # periods, sometimes more than the official 32-per-answer limit
        return text + "." * rng.choice([1, 2, 3, 31, 32, 33, 40])
    if kind == 9:  # digits <-> number words
        swaps = {"2": "two", "two": "2", "0": "none", "none": "0", "10": "ten", "3": "three"}
        return " ".join(swaps.get(w, w) for w in text.split(" "))
    if kind == 10:  # apostrophes dropped or typographic
        return rng.choice([text.replace("'", ""), text.replace("'", "\u2019")])
    return text + rng.choice([", 1,000", " 1,000", ",000", " 3.5", " 2.", ". 5"])


def variant(rng: random.Random, text: str, changes: float) -> str:
    while rng.random() < changes:
        text = perturb(rng, text)
    return text


def generate_case(rng: random.Random) -> dict:
    n = 10 if rng.random() < 0.8 else rng.randint(2, 12)
    mode = rng.randrange(5)
    truth = base_answer(rng)
    if mode == 4:  # identical answers with a newline or tab inside (it becomes a space)
        inner = truth.replace(" ", rng.choice(["\t", "\n"])) if " " in truth else truth + "\tx"
        humans = [inner] * n
        truth = inner.replace("\t", " ").replace("\n", " ")
    elif mode == 0:  # every human answer identical (the official code then normalises nothing)
        humans = [variant(rng, truth, 0.4)] * n
    elif mode == 1:  # identical once stripped of whitespace at the ends
        padded = rng.choice(["", " ", "\n", "\t"]) + truth + rng.choice(["", " ", "\n"])
        humans = [rng.choice([padded, truth]) for _ in range(n)]
    elif mode == 2:  # k answers close to the truth, the rest other answers
        k = rng.randint(0, n)
        humans = [variant(rng, truth, 0.5) for _ in range(k)]
        humans += [variant(rng, base_answer(rng), 0.3) for _ in range(n - k)]
        rng.shuffle(humans)
    else:  # variants of two or three answers
        options = [truth, base_answer(rng), base_answer(rng)]
        humans = [variant(rng, rng.choice(options), 0.5) for _ in range(n)]
    if rng.random() < 0.85:
        prediction = variant(rng, truth, 0.45)
    else:
        prediction = variant(rng, base_answer(rng), 0.5)
    return {
        "prediction": prediction,
        "human_answers": humans,
        "question_type": rng.choice(QUESTION_TYPES),
        "answer_type": rng.choice(ANSWER_TYPES),
    }


def hand_cases() -> list[dict]:
    """Cases named in the documentation, always part of the fixture."""
    yes = ["yes", "yes", "Yes!", "Yes!", "yes", "yes", "yes", "yes", "yes", "yes"]
    rows = [
        ("Yes!", yes),
        ("Yes", ["yes"] * 10),
        ("yes", ["yes"] * 10),
        ("yes", [" yes", "yes\n"] * 5),
        ("two", ["2"] * 4 + ["3"] * 6),
        ("2", ["two"] * 10),
        ("dont", ["don't"] * 3 + ["no"] * 7),
        ("red ball", ["red\tball"] * 10),
        ("red\nball", ["red ball"] * 10),
        ("yes", ["yes:"] * 3 + ["no"] * 7),
        ("it s", ["it's"] * 4 + ["its"] * 6),
        ("\u0663\u0665", ["\u0663.\u0665"] * 5 + ["four"] * 5),  # Arabic-Indic 3.5
        ("3 \u0665", ["3,\u0665"] * 4 + ["no"] * 6),
        ("x", ["." * 33 + "x"] * 3 + ["x"] * 7),
    ]
    return [
        {"prediction": p, "human_answers": h, "question_type": "is the", "answer_type": "yes/no"}
        for p, h in rows
    ]


def run_official(official: Path, python2: str, cases: list[dict]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        driver, inputs, outputs = (Path(tmp) / n for n in ("driver.py", "in.json", "out.json"))
        driver.write_text(_DRIVER)
        inputs.write_text(json.dumps(cases, ensure_ascii=False), encoding="utf-8")
        subprocess.run(
            [python2, str(driver), str(official.parent), str(inputs), str(outputs)], check=True
        )
        return json.loads(outputs.read_text())


def _one_case_a_line(fixture: dict) -> str:
    head = {k: v for k, v in fixture.items() if k != "cases"}
    text = json.dumps(head, indent=1, ensure_ascii=False)[:-2]  # without the closing "\n}"
    lines = ",\n  ".join(json.dumps(case, ensure_ascii=False) for case in fixture["cases"])
    return f'{text},\n "cases": [\n  {lines}\n ]\n}}\n'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("official", type=Path, help="path of the official vqaEval.py")
    parser.add_argument("--python2", default="python2.7", help="a Python 2.7 interpreter")
    parser.add_argument("--cases", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=Path("tests/tasks/data/vqa_official_cases.json")
    )
    args = parser.parse_args(argv)
    if args.official.name != "vqaEval.py" or not args.official.is_file():
        parser.error(f"{args.official} is not the official vqaEval.py")
    rng = random.Random(args.seed)
    cases = hand_cases()
    cases += [generate_case(rng) for _ in range(args.cases - len(cases))]
    official = run_official(args.official, args.python2, cases)
    for case, accuracy, reported in zip(cases, official["accuracy"], official["reported"]):
        case["accuracy"] = accuracy
        case["reported"] = reported
    fixture = {
        "source": "GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py",
        "source_sha256": hashlib.sha256(args.official.read_bytes()).hexdigest(),
        "interpreter": f"Python {official['interpreter']}",
        "generator": "scripts/vqa_official_cases.py",
        "seed": args.seed,
        "overall": official["overall"],
        "per_question_type": official["per_question_type"],
        "per_answer_type": official["per_answer_type"],
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(_one_case_a_line(fixture), encoding="utf-8")
    scores = sorted({round(c["accuracy"], 6) for c in cases})
    print(f"wrote {len(cases)} cases to {args.out}; distinct scores {scores}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
