"""Normalized n-gram overlap between problems: train prompts that copy an eval or validation
problem (decontamination), and near-duplicate problems inside one pool.

The check is the field's common one (GPT-3's contamination study), 13-grams of normalized
tokens, with one stated change: a train prompt overlaps a problem when the 13-grams they share
cover at least 20 of its tokens (or all of a problem shorter than that), not when one 13-gram is
shared. CodeIO's input/output specs repeat formulaic 13-token phrases ("output return list of
str a list of strings where each string represents"): on the demo's data, of 426 CodeIO pairs
sharing a 13-gram, 338 shared only 13-19 tokens of such phrasing. Normalized: lowercased, every run of
characters that is not a letter, digit or underscore is a separator, so whitespace and
punctuation do not matter and identifiers stay whole (`has_close_elements` is one token). A copy
with other whitespace, or with renamed functions and arguments around an unchanged description,
still shares 13-grams; a paraphrase does not (this check does not claim to find paraphrases).

A problem's text is what a model is shown of it: `question` (+ `starter_code`) for the stdin and
call kinds, the code `prompt` for HumanEval's; never the pipeline's own instruction wrapper.
N-grams that occur in more than `max_shared` distinct problems of everything compared (prepare:
every problem of the sources it loads, CodeIO's converted or not) are template text (CodeIO's questions share their instructions around each description); they, and
every window that reaches into the tokens they cover, are ignored: they say nothing about one
problem, and a window of a description's last words plus the instructions after it would match
any description ending the same way. A text shorter than n tokens is one gram of all its tokens,
so it matches only the same short text.
"""
from __future__ import annotations

import collections
import re
from typing import Iterable

NGRAM = 13
MIN_TOKENS = 20
MAX_SHARED = 10
TOKEN = re.compile(r"\w+")
SYMBOL = re.compile(r"\w+|[^\w\s]")
PYTHON_BLOCK = re.compile(r"```python\n.*?(```|$)", re.S)


def tokens(text: str) -> list[str]:
    return TOKEN.findall(text.lower())


def gram_list(text: str, n: int = NGRAM) -> list[int]:
    """The hashes of the text's normalized n-grams in order (hashes are compared within one
    process only); a text shorter than n tokens is one gram of all its tokens."""
    toks = tokens(text)
    if len(toks) < n:
        return [hash(tuple(toks))] if toks else []
    return [hash(tuple(toks[i:i + n])) for i in range(len(toks) - n + 1)]


def ngrams(text: str, n: int = NGRAM) -> set[int]:
    return set(gram_list(text, n))


def problem_text(problem: dict) -> str:
    if problem.get("kind", "humaneval") == "humaneval" or "question" not in problem:
        return problem.get("prompt") or ""
    return "\n".join(filter(None, [problem.get("question"), problem.get("starter_code")]))


def shared_ngrams(grams: Iterable[set[int]], max_shared: int = MAX_SHARED) -> set[int]:
    """The n-grams found in more than `max_shared` of the given problems' sets: template text."""
    counts = collections.Counter()
    for one in grams:
        counts.update(one)
    return {gram for gram, count in counts.items() if count > max_shared}


def template_tokens(grams: list[int], template: set[int], n: int = NGRAM) -> list[bool]:
    """Per token of a text (of its n-grams `grams`): whether a template n-gram covers it."""
    if len(grams) <= 1:
        count = n if grams and len(grams) == 1 else 0
        return [bool(grams) and grams[0] in template] * count
    covered = [False] * (len(grams) + n - 1)
    end = -1
    for i, gram in enumerate(grams):
        if gram in template:
            for j in range(max(i, end), i + n):
                covered[j] = True
            end = i + n
    return covered


def content_grams(grams: list[int], template: set[int], n: int = NGRAM) -> set[int]:
    """The n-grams of a text that touch no template token. A token is template text when a
    template n-gram covers it; a window reaching into it (the last words of a description and
    the first of the instructions after it) would match any problem whose description ends the
    same way, so it does not count either."""
    if len(grams) <= 1:
        return set(grams) - template
    covered = template_tokens(grams, template, n)
    before = [0]
    for flag in covered:
        before.append(before[-1] + flag)
    return {gram for i, gram in enumerate(grams) if before[i + n] == before[i]}


def reference_length(problem: dict, grams: list[int], template: set[int], n: int) -> int:
    if len(grams) <= 1:
        return len(tokens(problem_text(problem)))
    return sum(not flag for flag in template_tokens(grams, template, n))


class Index:
    """Which reference problems (of which named set) hold each content n-gram."""

    def __init__(self, references: dict[str, list[dict]], grams: dict[str, set[int]]):
        self._owners: dict[int, list[tuple[str, str]]] = collections.defaultdict(list)
        for name, problems in references.items():
            for problem in problems:
                for gram in grams[problem["task_id"]]:
                    self._owners[gram].append((name, problem["task_id"]))

    def covered(self, grams: list[int], content: set[int], n: int) -> dict[tuple[str, str], int]:
        """{(set name, task_id): how many of the text's tokens the n-grams it shares with that
        reference problem cover}, for every reference sharing one."""
        starts: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
        for i, gram in enumerate(grams):
            if gram in content:
                for owner in self._owners.get(gram, ()):
                    starts[owner].append(i)
        width = n if len(grams) > 1 else 0
        out = {}
        for owner, positions in starts.items():
            total, end = 0, -1
            for i in positions:  # increasing: the union of the windows [i, i + n)
                total += i + width - max(i, end) if i + width > end else 0
                end = max(end, i + width)
            out[owner] = total
        return out


def decontaminate(candidates: list[dict], references: dict[str, list[dict]], n: int = NGRAM,
                  max_shared: int = MAX_SHARED, min_tokens: int = MIN_TOKENS,
                  examples: int = 5, corpus: Iterable[dict] = ()) -> tuple[list[dict], dict]:
    """(the candidates that overlap no reference problem, a report). A candidate overlaps a
    reference when the content n-grams they share cover at least `min_tokens` of its tokens, or
    as many as the reference has outside template text where that is fewer (a short problem
    copied whole).
    A candidate is dropped if it overlaps any reference set; the report counts it under every set
    it overlaps (`dropped`), once in `dropped_total`, and names the first few pairs per set. A
    candidate that is itself one of the references (same task_id) is never compared with itself.
    Template n-grams are counted over the candidates, the references and `corpus` (problems by
    task_id, each once): a caller passes whole pools there so the template text does not depend
    on which of their problems became candidates."""
    texts = {p["task_id"]: gram_list(problem_text(p), n) for p in candidates}
    for problems in references.values():
        texts.update({p["task_id"]: gram_list(problem_text(p), n) for p in problems if p["task_id"] not in texts})
    counted = dict(texts)
    for p in corpus:
        if p["task_id"] not in counted:
            counted[p["task_id"]] = gram_list(problem_text(p), n)
    template = shared_ngrams((set(g) for g in counted.values()), max_shared)
    grams = {task_id: content_grams(g, template, n) for task_id, g in texts.items()}
    # a reference's own tokens, template text left out: all of them copied is a copy
    lengths = {p["task_id"]: reference_length(p, texts[p["task_id"]], template, n)
               for problems in references.values() for p in problems}
    index = Index(references, grams)
    kept, dropped, pairs = [], collections.Counter(), collections.defaultdict(list)
    for problem in candidates:
        task_id = problem["task_id"]
        found: dict[str, list[str]] = collections.defaultdict(list)
        for (name, ref_id), covered in index.covered(texts[task_id], grams[task_id], n).items():
            if ref_id != task_id and covered >= min(min_tokens, lengths[ref_id]):
                found[name].append(ref_id)
        if not found:
            kept.append(problem)
            continue
        for name, ids in found.items():
            dropped[name] += 1
            if len(pairs[name]) < examples:
                pairs[name].append([task_id, sorted(ids)[0]])
    report = {"ngram": n, "min_tokens": min_tokens, "max_shared": max_shared, "checked": len(candidates),
              "dropped_total": len(candidates) - len(kept),
              "dropped": {name: dropped.get(name, 0) for name in references},
              "examples": dict(pairs), "template_ngrams": len(template)}
    return kept, report


def near_duplicate_key(problem: dict) -> tuple:
    """What two problems that ask the same thing with other code share: the text a model is
    shown without its ```python blocks (CodeIO shows its reference's signature in one), lowercased,
    whitespace ignored, punctuation kept (HumanEval/56 and /61 differ only in "(" and "<")."""
    return tuple(SYMBOL.findall(PYTHON_BLOCK.sub(" ", problem_text(problem)).lower()))


def without_near_duplicates(problems: list[dict]) -> tuple[list[dict], list[list[str]]]:
    """(problems, [[dropped task_id, the kept one it repeats], ...]): of problems with one
    near_duplicate_key (CodeIO rows with one description and other reference code), the one with
    the smallest task_id is kept, so the choice does not depend on file order."""
    first: dict[tuple, str] = {}
    for problem in sorted(problems, key=lambda p: p["task_id"]):
        first.setdefault(near_duplicate_key(problem), problem["task_id"])
    kept, dropped = [], []
    for problem in problems:
        owner = first[near_duplicate_key(problem)]
        if owner == problem["task_id"] or not near_duplicate_key(problem):
            kept.append(problem)
        else:
            dropped.append([problem["task_id"], owner])
    return kept, dropped
