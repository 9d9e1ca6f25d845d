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
