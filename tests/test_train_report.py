"""Training pieces (masking, schedule, a real tiny run) and the report's statistics."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from conftest import train_config
from tasks.core.metrics import paired_bootstrap, pass_at_k
from tasks.train import IGNORE, encode, lr_at, micro_batches


def test_loss_mask_covers_only_the_answer(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    messages = [{"role": "user", "content": "question"}, {"role": "assistant", "content": "answer"}]
    ids, labels = encode(tok, messages, max_length=512)
    answer = [i for i, l in zip(ids, labels) if l != IGNORE]
    assert tok.decode(answer).startswith("answer") and tok.decode(answer).endswith("<|im_end|>\n")
    assert "question" not in tok.decode(answer)


def test_schedule_warms_up_then_decays_to_min_lr():
    cfg = train_config(lr=1e-4, min_lr=1e-5, warmup_steps=4)
    lrs = [lr_at(s, 20, cfg) for s in range(20)]
    assert lrs[:4] == pytest.approx([2.5e-5, 5e-5, 7.5e-5, 1e-4])
    assert all(a >= b for a, b in itertools.pairwise(lrs[3:]))
    assert lr_at(20, 20, cfg) == pytest.approx(1e-5)


def test_epochs_cover_every_example_once_per_epoch():
    cfg = train_config(micro_batch_size=3, grad_accum=2, seed=0)
    batches = micro_batches(12, cfg, total_steps=4)  # 24 examples = 2 epochs of 12
    flat = [i for b in batches for i in b]
    assert sorted(flat[:12]) == list(range(12)) and sorted(flat[12:]) == list(range(12))


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
