"""Lock/fork diagnostics (the paper's account of why SSD works), teacher-forced on reference
solutions.

Code mixes *lock* positions (one right token and a low-probability tail of distractors) with
*fork* positions (several viable continuations). SSD trains the model toward its own truncated,
tempered distribution: tails at locks should shrink while forks keep their spread. For every
answer token of a reference solution, given everything before it, this measures on the model's
next-token distribution:
  - the cumulative probability mass of its top-r tokens (r = 1..RANKS), at T = 1;
  - the mass kept inside the top-k / top-p set at the evaluation T (the "kept mass");
  - the entropy of that truncated, renormalised distribution;
  - how many tokens survive the truncation at each T of a sweep.
Positions are classed once, by the *base* model at T = 1, so that every model is measured on
the same positions: lock where its top token has at least `lock_threshold` of the mass, fork
where the top token has less than `fork_threshold` and a second token at least 0.1 (two or more
viable continuations), other otherwise.
"""
from __future__ import annotations

import torch

from tasks.core.files import DataError

RANKS = 20
SECOND_VIABLE = 0.1  # a fork's second token has at least this much probability


def reference_answer(problem: dict) -> str | None:
    """A reference solution as a model would answer the project's prompt: one fenced block."""
    if problem.get("kind", "humaneval") == "humaneval":
        if not problem.get("canonical_solution"):
            return None
        return f"```python\n{problem['prompt']}{problem['canonical_solution'].rstrip()}\n```"
    if problem.get("canonical_solution"):
        return f"```python\n{problem['canonical_solution'].rstrip()}\n```"
    return None


def truncation_mask(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Which tokens survive temperature -> top-k -> top-p (transformers' rules: ties at the k-th
    logit kept; top-p keeps the smallest set whose mass reaches top_p)."""
    scaled = logits / max(temperature, 1e-6)
    keep = torch.ones_like(scaled, dtype=torch.bool)
    if top_k:
        kth = torch.topk(scaled, min(top_k, scaled.size(-1)), dim=-1).values[..., -1:]
        keep &= scaled >= kth
    if top_p < 1.0:
        probs = torch.softmax(scaled.masked_fill(~keep, float("-inf")), dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass strictly above each token
        keep_sorted = before < top_p
        keep &= torch.zeros_like(keep).scatter(-1, order, keep_sorted)
    return keep


CANDIDATE_MARGIN = 16  # candidates beyond top_k, so that ties at the k-th value after scaling are in reach


def candidates(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each position's tokens that top-k can keep at any temperature, by descending logit:
    (values, vocab ids). Scaling by T keeps the order, so truncation at every T is decided on
    these few columns instead of a sort of the vocabulary per T."""
    vocab = logits.size(-1)
    width = vocab if not top_k or top_k + CANDIDATE_MARGIN >= vocab else top_k + CANDIDATE_MARGIN
    values, ids = logits.topk(width, dim=-1)  # sorted, descending
    return values, ids


def kept_candidates(values: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor | None:
    """truncation_mask's rule on `candidates`' columns (descending logits): which survive
    temperature -> top-k -> top-p. None where a column outside them could tie the k-th value
    after scaling (the caller then widens to the whole vocabulary)."""
    scaled = values / max(temperature, 1e-6)
    keep = torch.ones_like(scaled, dtype=torch.bool)
    if top_k and top_k < scaled.size(-1):
        kth = scaled[:, top_k - 1:top_k]
        keep = scaled >= kth
        if bool(keep[:, -1].any()):
            return None
    if top_p < 1.0:
        probs = torch.softmax(scaled.masked_fill(~keep, float("-inf")), dim=-1)
        before = probs.cumsum(-1) - probs  # mass strictly above each column (columns are in descending order)
        keep &= before < top_p
    return keep


def position_stats(logits: torch.Tensor, cfg, temperatures: list[float]) -> dict[str, torch.Tensor]:
    """Per position ([positions x vocab] logits): the statistics in the module doc. Truncation
    is truncation_mask's, computed on the top-k candidates (tests compare the two)."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    top = probs.topk(RANKS, dim=-1).values
    values, ids = candidates(logits, cfg.top_k)

    def keep_at(temperature: float) -> torch.Tensor:
        nonlocal values, ids
        keep = kept_candidates(values, temperature, cfg.top_k, cfg.top_p)
        if keep is None:  # ties beyond the candidates: every column
            values, ids = candidates(logits, 0)
            keep = kept_candidates(values, temperature, cfg.top_k, cfg.top_p)
        return keep

    keep = keep_at(cfg.temperature)
    truncated = torch.softmax((values / max(cfg.temperature, 1e-6)).masked_fill(~keep, float("-inf")), dim=-1)
    entropy = -(truncated * truncated.clamp_min(1e-30).log()).sum(-1)
    kept_mass = (probs.gather(-1, ids) * keep).sum(-1)
    surviving = torch.stack([keep_at(t).sum(-1).float() for t in temperatures], dim=-1)
    return {"cum_mass": top.cumsum(-1), "kept_mass": kept_mass, "entropy": entropy,
            "surviving": surviving, "top1": top[:, 0], "top2": top[:, 1]}


def classify(stats: dict[str, torch.Tensor], lock_threshold: float, fork_threshold: float) -> list[str]:
    classes = []
    for top1, top2 in zip(stats["top1"].tolist(), stats["top2"].tolist()):
        if top1 >= lock_threshold:
            classes.append("lock")
        elif top1 < fork_threshold and top2 >= SECOND_VIABLE:
            classes.append("fork")
        else:
            classes.append("other")
    return classes


def summarize(stats: list[dict[str, torch.Tensor]], classes: list[list[str]], temperatures: list[float]) -> dict:
    """Means over positions, overall and per class; and per problem, in the problems' order, the
    class's position count and the sums of kept mass and entropy over them (the report's paired
    bootstrap resamples problems: positions of one problem move together)."""
    flat = {key: torch.cat([s[key] for s in stats]) for key in stats[0]}
    labels = [c for per_problem in classes for c in per_problem]
    out = {}
    for name in ("all", "lock", "fork", "other"):
        index = torch.tensor([i for i, c in enumerate(labels) if name == "all" or c == name], dtype=torch.long)
        if len(index) == 0:
            continue
        pick = {key: value[index] for key, value in flat.items()}
        out[name] = {
            "positions": len(index),
            "kept_mass": float(pick["kept_mass"].mean()),
            "entropy": float(pick["entropy"].mean()),
            "top1_mass": float(pick["top1"].mean()),
            "cum_mass_by_rank": [round(float(v), 5) for v in pick["cum_mass"].mean(0)],
            "surviving_by_temperature": {str(t): round(float(v), 3)
                                         for t, v in zip(temperatures, pick["surviving"].mean(0))},
            "per_problem": per_problem_sums(stats, classes, name),
        }
    return out


def per_problem_sums(stats: list[dict[str, torch.Tensor]], classes: list[list[str]], name: str) -> dict:
    """{positions: [...], kept_mass: [...], entropy: [...]}: per problem, the count of its
    positions of class `name` ("all": every position) and the sums of each statistic over them."""
    sums = {"positions": [], "kept_mass": [], "entropy": []}
    for problem_stats, problem_classes in zip(stats, classes):
        mask = torch.tensor([name == "all" or c == name for c in problem_classes], dtype=torch.bool)
        sums["positions"].append(int(mask.sum()))
        for key in ("kept_mass", "entropy"):
            sums[key].append(float(problem_stats[key][mask].sum()))
    return sums


@torch.inference_mode()
def diagnose(model, tokenizer, problems: list[dict], cfg, temperatures: list[float],
             base_classes: dict[str, list[str]] | None, lock_threshold: float, fork_threshold: float,
             progress=None) -> tuple[dict, list[list[str]]]:
    """The model's statistics on each problem's reference answer; positions classed by
    `base_classes` (the base model's classes by task id), or by this model when it is the base.
    A problem the base did not class, or whose answer has another number of positions here, is
    refused: the classes would land on other tokens."""
    from tasks.core.modeling import chat_token_ids
    from tasks.core.problems import chat_messages

    stats, classes = [], []
    for problem in problems:
        messages = chat_messages(problem)
        prompt = chat_token_ids(tokenizer, messages, add_generation_prompt=True)
        full = chat_token_ids(tokenizer, messages + [{"role": "assistant", "content": reference_answer(problem)}],
                              add_generation_prompt=False)
        if full[:len(prompt)] != prompt:
            raise ValueError("the chat template renders the prompt differently inside the full chat")
        logits = model(input_ids=torch.tensor([full], device=model.device)).logits[0]
        per_position = position_stats(logits[len(prompt) - 1:-1], cfg, temperatures)
        stats.append(per_position)
        if base_classes is None:
            classes.append(classify(per_position, lock_threshold, fork_threshold))
        else:
            known = base_classes.get(problem["task_id"])
            positions = len(per_position["top1"])
            if known is None or len(known) != positions:
                raise DataError(f"the base model's classes do not fit {problem['task_id']}: "
                                + ("it was not classed" if known is None else
                                   f"{len(known)} classed positions, {positions} here")
                                + "; rerun diagnose-base with the same problems and tokenizer")
            classes.append(known)
        if progress:
            progress(1)
    return summarize(stats, classes, temperatures), classes
