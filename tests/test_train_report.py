"""Training pieces (masking; the schedule and data order are in test_training.py) and the report's statistics."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tasks.core.metrics import paired_bootstrap, pass_at_k
from tasks.training.sft import IGNORE, encode


def test_loss_mask_covers_only_the_answer(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    messages = [{"role": "user", "content": "question"}, {"role": "assistant", "content": "answer"}]
    ids, labels = encode(tok, messages, max_length=512)
    answer = [i for i, l in zip(ids, labels) if l != IGNORE]
    assert tok.decode(answer).startswith("answer") and tok.decode(answer).endswith("<|im_end|>\n")
    assert "question" not in tok.decode(answer)


def test_a_cut_off_answer_trains_no_end_of_turn_label(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    answer = "x = 1\nx = 1\nx = 1\nwhile x:"  # repeats itself, as runs to max_new_tokens often do
    messages = [{"role": "user", "content": "question"}, {"role": "assistant", "content": answer}]
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    finished_ids, finished = encode(tok, messages, max_length=512)
    ids, labels = encode(tok, messages, max_length=512, open_end=True)
    assert ids == finished_ids  # the same tokens, fewer of them trained
    last = max(i for i, l in enumerate(labels) if l != IGNORE)
    assert tok.decode([l for l in labels if l != IGNORE]) == answer and labels[last] == tok.encode(answer)[-1]
    assert ids[last + 1:] == tok.encode("<|im_end|>\n") and set(labels[last + 1:]) == {IGNORE}
    assert end_of_turn in finished and finished[last + 1:] == ids[last + 1:]  # a finished answer trains them
    # Cut by train.max_length inside the answer: the same tokens trained either way.
    inside = len(finished) - 6
    assert encode(tok, messages, max_length=inside, open_end=True) == encode(tok, messages, max_length=inside)


@pytest.mark.parametrize("n, c, k", [(10, 3, 1), (10, 3, 5), (5, 0, 2), (5, 5, 3), (2, 1, 2)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
    # The definition: the chance that k of the n samples, drawn without replacement, include a pass.
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_pass_at_k_needs_k_samples():
    with pytest.raises(ValueError, match="pass@3 needs at least 3 samples"):
        pass_at_k(2, 2, 3)


def test_paired_bootstrap():
    base = {f"t{i}": 0.0 for i in range(50)}
    same = paired_bootstrap(base, base, 500, 0, 0.95)
    assert same == (0.0, 0.0, 0.0)
    better = {t: 1.0 if i < 25 else 0.0 for i, t in enumerate(base)}
    diff, lo, hi = paired_bootstrap(better, base, 2000, 0, 0.95)
    assert diff == 0.5 and 0.3 < lo < 0.5 < hi < 0.7


def test_the_headline_is_one_flat_number_per_key(tmp_path, monkeypatch):
    """report/headline.json (DVC's only metrics) and report/t_eval/<model>.json (a plot source)."""
    from tasks import report

    diag = {"lock": {"kept_mass": 0.9, "entropy": 0.2, "positions": 5},
            "fork": {"kept_mass": 0.6, "entropy": 1.5, "positions": 3}, "all": {"positions": 20, "top1_mass": 0.7}}
    summary = {
        "sets": {name: {"problems": 4, "models": {
            "base": {"t_eval": 0.5, "pass@1": 0.25, "pass@2": 0.5, "by_difficulty": {"easy": 0.5}},
            "ssd-none": {"t_eval": 0.9, "pass@1": 0.5, "pass@2": 0.75, "delta_pass@1": 0.25,
                         "delta_pass@1_ci": [0.0, 0.5], "kept": 7}}} for name in ("humaneval", "codeio")},
        "t_eval": {"base": {"chosen": 0.5, "validation_pass@1": {"0.5": 0.5, "0.9": 0.25}},
                   "ssd-none": {"chosen": 0.9, "validation_pass@1": {"0.5": 0.0, "0.9": 0.25}}},
        "arms": {"ssd-none": {"sample": "ssd", "filter": "none", "kept": 7, "final_loss": 1.25}},
        "diagnostics": {"base": diag, "ssd-none": {"all": diag["all"]}},
    }
    assert report.headline(summary) == {
        "humaneval.base.pass@1": 0.25, "humaneval.ssd-none.pass@1": 0.5,
        "codeio.base.pass@1": 0.25, "codeio.ssd-none.pass@1": 0.5,
        "t_eval.base": 0.5, "t_eval.ssd-none": 0.9, "train.ssd-none.loss": 1.25,
        "lock.base.kept_mass": 0.9, "fork.base.entropy": 1.5}

    monkeypatch.chdir(tmp_path)
    (tmp_path / "report/t_eval").mkdir(parents=True)
    (tmp_path / "report/t_eval/gone.json").write_text("[]")  # a model no longer in the report
    report.t_eval_curves(summary)
    assert sorted(p.name for p in (tmp_path / "report/t_eval").iterdir()) == ["base.json", "ssd-none.json"]
    assert json.loads((tmp_path / "report/t_eval/ssd-none.json").read_text()) == [
        {"T_eval": 0.5, "pass@1": 0.0}, {"T_eval": 0.9, "pass@1": 0.25}]


def test_the_diagnostics_figure_draws_each_mechanism_interval(tmp_path, monkeypatch):
    from tasks.analysis import plots

    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig))  # keep the figure to read it
    cls = {"cum_mass_by_rank": [0.9, 1.0], "positions": 3}
    model = {"lock": cls, "fork": cls, "all": {"surviving_by_temperature": {"0.5": 2.0, "1.0": 4.0}}}
    mechanism = {"ssd-none": {"base": {"lock.kept_mass": [0.02, 0.01, 0.03], "fork.entropy": [-0.1, -0.3, 0.05]}}}
    plots.diagnostics({"base": model, "ssd-none": model}, tmp_path / "d.png", mechanism)
    panel = drawn[0].axes[3]
    # One horizontal error bar per (arm, other, statistic), spanning exactly its CI.
    spans = sorted(tuple(np.round(seg[:, 0], 6)) for c in panel.containers for seg in c.lines[2][0].get_segments())
    assert spans == [(-0.3, 0.05), (0.01, 0.03)]
    assert [t.get_text() for t in panel.get_yticklabels()] == ["ssd-none vs base: lock kept mass",
                                                               "ssd-none vs base: fork entropy"]
