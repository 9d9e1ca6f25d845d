"""Lock/fork diagnostics: the truncation it measures is the samplers' own, and its classes are
the base model's positions."""
from __future__ import annotations


import pytest
import torch

from conftest import decoding
from tasks.analysis.diagnostics import classify, diagnose, position_stats, reference_answer, truncation_mask
from tasks.core.files import DataError
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


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 20, 0.8), (1.3, 0, 0.9), (0.5, 3, 1.0), (1.0, 5, 0.5),
                                                     (0.7, 0, 1.0)])
def test_statistics_on_candidates_equal_the_whole_vocabularys(temperature, top_k, top_p):
    torch.manual_seed(1)
    logits = torch.randn(48, 500) * 3
    logits[:, 7] = logits[:, 8]  # a tie, at whatever rank it lands
    logits[0, :60] = logits[0].max() + 1  # 60 tokens tied at the top: wider than top_k + the margin
    temperatures = [0.3, 1.0, 1.5]
    stats = position_stats(logits, decoding(temperature=temperature, top_k=top_k, top_p=top_p), temperatures)
    # The reference: truncation_mask over the whole vocabulary, the statistics as the module doc defines them.
    probs = torch.softmax(logits, -1)
    keep = truncation_mask(logits, temperature, top_k, top_p)
    tempered = torch.softmax(logits / temperature, -1) * keep
    tempered = tempered / tempered.sum(-1, keepdim=True)
    entropy = -(tempered * tempered.clamp_min(1e-30).log()).sum(-1)
    surviving = torch.stack([truncation_mask(logits, t, top_k, top_p).sum(-1).float() for t in temperatures], -1)
    assert torch.equal(stats["surviving"], surviving)
    torch.testing.assert_close(stats["kept_mass"], (probs * keep).sum(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["entropy"], entropy, rtol=1e-4, atol=1e-5)


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
    by_id = {p["task_id"]: c for p, c in zip(problems, classes)}
    again, same = diagnose(model, tokenizer, problems, cfg, [0.5, 1.0], by_id, 0.99, 0.01)
    assert same == classes and again == base  # the base's classes, whatever the thresholds now
    answer_tokens = sum(len(c) for c in classes)
    assert base["all"]["positions"] == answer_tokens > 100
    assert sum(base[c]["positions"] for c in ("lock", "fork", "other") if c in base) == answer_tokens
    # Classes that do not fit this model's positions are refused, not laid on other tokens.
    first, second = (p["task_id"] for p in problems)
    with pytest.raises(DataError, match=f"{second}: it was not classed"):
        diagnose(model, tokenizer, problems, cfg, [0.5, 1.0], {first: by_id[first]}, 0.9, 0.5)
    with pytest.raises(DataError, match=f"{first}: {len(by_id[first]) - 1} classed positions, {len(by_id[first])} here"):
        diagnose(model, tokenizer, problems, cfg, [0.5, 1.0], {**by_id, first: by_id[first][1:]}, 0.9, 0.5)


@pytest.mark.slow
@pytest.mark.parametrize("winner", [0.5, 0.9])
def test_t_eval_is_chosen_on_validation_before_any_test_problem_is_decoded(tmp_path, monkeypatch, tiny_model, winner):
    """The real `evaluate` on a tiny model, with the validation verdicts planted so that `winner`
    is best: every validation decoding comes before the first test decoding, and the test sets
    are decoded at `winner`, whichever it is."""
    import subprocess
    import sys

    from conftest import humaneval_only, make_workspace, stage_env
    from tasks import evaluate as stage

    root = make_workspace(tmp_path / "ws", tiny_model, {"data": humaneval_only(train=2)})
    for module in ("tasks.model", "tasks.prepare"):
        subprocess.run([sys.executable, "-m", module], cwd=root, env=stage_env(root), check=True, capture_output=True)
    monkeypatch.chdir(root)
    real, order = stage.answer_and_check, []

    def planted(backend, model_dir, p, *args):
        per_output = real(backend, model_dir, p, *args)
        for out, rows in zip(p.outputs, per_output):
            order.append((p.name, out.temperature))
            if p.name == "validation":
                for row in rows:
                    row["passed"] = out.temperature == winner
                stage.write_jsonl(out.path, rows)
        return per_output

    monkeypatch.setattr(stage, "answer_and_check", planted)
    metrics = stage.evaluate(str(root / "models/base"), "base")
    validation = [i for i, (name, _) in enumerate(order) if name == "validation"]
    tests = [i for i, (name, _) in enumerate(order) if name != "validation"]
    assert validation and tests and max(validation) < min(tests)
    assert metrics["validation"]["chosen_temperature"] == winner
    assert {t for i, (_, t) in enumerate(order) if i in tests} == {winner}
    assert metrics["sets"]["humaneval"]["temperature"] == winner





@pytest.mark.parametrize("more_solved, moves", [(1, False), (12, True)])
def test_t_eval_leaves_the_tie_breaker_only_beyond_validation_noise(tmp_path, monkeypatch, more_solved, moves):
    """40 validation problems: T=0.9 solving 1 more than the tie-breaker (0.7) is noise and does
    not move the choice; 12 more is not, and does."""
    import json

    from tasks.analysis.selection import choose_temperature, validation_answers
    from tasks.core import paths

    monkeypatch.chdir(tmp_path)
    solved = {0.5: 4, 0.7: 8, 0.9: 8 + more_solved}
    for t, count in solved.items():
        path = tmp_path / paths.validation_samples("base", t)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"task_id": f"v{i}", "passed": i < count}) + "\n" for i in range(40)))
    choice = choose_temperature(validation_answers("base", [0.5, 0.7, 0.9]), 0.7, 0.95, seed=0)
    assert choice["chosen"] == (0.9 if moves else 0.7)
    delta, low, high = choice["vs_tie_breaker"][0.9]
    assert delta == pytest.approx(more_solved / 40) and low <= delta <= high and (low > 0) == moves
    assert choice["vs_tie_breaker"][0.5][0] == pytest.approx(-4 / 40) and set(choice["vs_tie_breaker"]) == {0.5, 0.9}
    assert choice["pass@1"] == {t: pytest.approx(c / 40) for t, c in solved.items()}
