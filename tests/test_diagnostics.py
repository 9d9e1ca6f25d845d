"""Lock/fork diagnostics: the truncation it measures is the samplers' own, and its classes are
the base model's positions."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import decoding
from tasks.analysis.diagnostics import classify, diagnose, position_stats, reference_answer, truncation_mask
from tasks.core.problems import load_problems


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 20, 0.8), (1.3, 0, 0.9), (0.5, 3, 1.0), (1.0, 5, 0.5)])
def test_truncation_is_transformers_warpers(temperature, top_k, top_p):
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(64, 300) * 3
    logits[:, 7] = logits[:, 8]  # a tie, at whatever rank it lands
    warped = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        warped = TopKLogitsWarper(top_k)(None, warped)
    if top_p < 1:
        warped = TopPLogitsWarper(top_p)(None, warped)
    assert torch.equal(truncation_mask(logits, temperature, top_k, top_p), torch.isfinite(warped))


def test_statistics_of_a_known_distribution():
    logits = torch.log(torch.tensor([[0.95, 0.04, 0.01] + [1e-9] * 27, [0.45, 0.40, 0.15] + [1e-9] * 27]))
    stats = position_stats(logits, decoding(temperature=1.0, top_k=0, top_p=0.9), temperatures=[1.0])
    assert classify(stats, lock_threshold=0.9, fork_threshold=0.5) == ["lock", "fork"]
    # top-p 0.9 keeps {0.95} at the lock and {0.45, 0.40, 0.15} at the fork (0.85 < 0.9).
    assert stats["kept_mass"].tolist() == pytest.approx([0.95, 1.0], abs=1e-6)
    assert stats["surviving"][:, 0].tolist() == [1.0, 3.0]
    assert stats["entropy"][0].item() == pytest.approx(0.0, abs=1e-6)
    assert stats["cum_mass"][1, 1].item() == pytest.approx(0.85, abs=1e-6)


def test_every_model_is_measured_on_the_base_models_positions(tiny_model):
    from tasks.core.modeling import load_pretrained

    problems = [p for p in load_problems("humaneval")[:2]]
    assert all(reference_answer(p).startswith("```python\n") for p in problems)
    model, tokenizer = load_pretrained(tiny_model)
    cfg = decoding(temperature=0.7, top_k=20, top_p=0.8)
    base, classes = diagnose(model, tokenizer, problems, cfg, [0.5, 1.0], None, 0.9, 0.5)
    again, same = diagnose(model, tokenizer, problems, cfg, [0.5, 1.0], classes, 0.99, 0.01)
    assert same == classes and again == base  # the base's classes, whatever the thresholds now
    answer_tokens = sum(len(c) for c in classes)
    assert base["all"]["positions"] == answer_tokens > 100
    assert sum(base[c]["positions"] for c in ("lock", "fork", "other") if c in base) == answer_tokens


def test_t_eval_choice_reads_validation_answers_only(tmp_path, monkeypatch):
    """Change every test result: the chosen T_eval stays; change validation results: it moves."""
    import json

    from tasks.analysis.selection import choose_temperature, validation_pass_at_1
    from tasks.core import paths

    monkeypatch.chdir(tmp_path)
    rows = {0.5: [1, 0, 0, 0], 0.7: [1, 1, 0, 0], 0.9: [1, 1, 0, 0]}  # 0.7 and 0.9 tie; 0.7 is nearer 0.7

    def write(path, passed):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text("".join(json.dumps({"task_id": f"v{i}", "passed": bool(p)}) + "\n"
                                      for i, p in enumerate(passed)))

    for t, passed in rows.items():
        write(paths.validation_samples("base", t), passed)
    write(paths.eval_samples("base", "humaneval"), [0, 0, 0, 0])
    assert choose_temperature(validation_pass_at_1("base", list(rows)), 0.7) == 0.7
    write(paths.eval_samples("base", "humaneval"), [1, 1, 1, 1])  # every test result changes
    assert choose_temperature(validation_pass_at_1("base", list(rows)), 0.7) == 0.7
    write(paths.validation_samples("base", 0.5), [1, 1, 1, 0])
    assert choose_temperature(validation_pass_at_1("base", list(rows)), 0.7) == 0.5



