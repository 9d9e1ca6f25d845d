"""The sampling loop and the `sample` stage: semantics, determinism, resume after SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import build_tiny_model, decoding, humaneval_only, interrupted_run, make_workspace, stage_env
from tasks.sampling.backend_transformers import TransformersBackend
from tasks.sampling.generate import Request, generate_jsonl


@pytest.fixture(scope="module")
def backend(tiny_model):
    return TransformersBackend(tiny_model, dtype=torch.float32)


def requests(count=5):
    return [Request({"prompt_id": f"p{i}"}, [{"role": "user", "content": "x" * (i + 1)}]) for i in range(count)]


def test_rows_counts_and_finish_reasons(tmp_path, backend, tiny_model):
    cfg = decoding(n=3, max_new_tokens=24, batch_size=4, temperature=1.0, top_k=0, top_p=1.0)
    rows = generate_jsonl(tiny_model, requests(), cfg, tmp_path / "s.jsonl", backend=backend)
    assert [(r["prompt_id"], r["sample_index"]) for r in rows] == [(f"p{i}", s) for i in range(5) for s in range(3)]
    assert {r["finish_reason"] for r in rows} == {"eos", "length"}
    for row in rows:
        assert (row["num_tokens"] == 24) == (row["finish_reason"] == "length") or row["num_tokens"] == 24
        assert 1 <= row["num_tokens"] <= 24
    assert not (tmp_path / "s.jsonl.partial").exists()
    on_disk = [json.loads(l) for l in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert on_disk == rows


def test_same_seed_same_samples_other_seed_differs(tmp_path, backend, tiny_model):
    cfg = decoding(n=2, max_new_tokens=16, batch_size=3)
    a = generate_jsonl(tiny_model, requests(), cfg, tmp_path / "a.jsonl", backend=backend)
    b = generate_jsonl(tiny_model, requests(), cfg, tmp_path / "b.jsonl", backend=backend)
    c = generate_jsonl(tiny_model, requests(), cfg.model_copy(update={"seed": 7}), tmp_path / "c.jsonl",
                       backend=backend)
    assert [r["text"] for r in a] == [r["text"] for r in b]
    assert [r["text"] for r in a] != [r["text"] for r in c]


def test_greedy_is_batch_invariant(backend):
    cfg = decoding(temperature=0.0, max_new_tokens=12)
    prompts = [backend.encode_chat(r.messages) for r in requests(3)]
    batched = backend.generate_batch(prompts, cfg, seed=0)
    alone = [backend.generate_batch([p], cfg, seed=0)[0] for p in prompts]
    assert batched == alone


def test_top_k_one_is_greedy(backend):
    prompts = [backend.encode_chat(r.messages) for r in requests(2)]
    greedy = backend.generate_batch(prompts, decoding(temperature=0.0, max_new_tokens=10), seed=0)
    top1 = backend.generate_batch(prompts, decoding(temperature=1.5, top_k=1, max_new_tokens=10), seed=3)
    assert greedy == top1


def test_resume_drops_torn_batches(tmp_path, backend, tiny_model, capsys):
    cfg = decoding(n=2, max_new_tokens=16, batch_size=3)
    full = generate_jsonl(tiny_model, requests(), cfg, tmp_path / "full.jsonl", backend=backend)
    # A crash mid-write: batch 0 complete, one row of batch 1, then a torn line.
    partial = interrupted_run(tiny_model, requests(), cfg, tmp_path / "resumed.jsonl", backend, batches=1)
    row_of_batch_1 = next(r for r in full if r["batch"] == 1)
    partial.write_text(partial.read_text() + json.dumps(row_of_batch_1) + "\n" + '{"prompt_id": "p0", "sam')
    resumed = generate_jsonl(tiny_model, requests(), cfg, tmp_path / "resumed.jsonl", backend=backend)
    assert resumed == full
    assert "resuming, 3 of 10 completions already written" in capsys.readouterr().out


def test_resume_after_a_param_change_equals_a_clean_run_at_the_new_value(tmp_path, backend, tiny_model, capsys):
    old, new = decoding(n=2, max_new_tokens=16, batch_size=3), decoding(n=2, max_new_tokens=16, batch_size=3,
                                                                       temperature=1.5)
    clean = generate_jsonl(tiny_model, requests(), new, tmp_path / "clean.jsonl", backend=backend)
    interrupted_run(tiny_model, requests(), old, tmp_path / "out.jsonl", backend, batches=2)
    rows = generate_jsonl(tiny_model, requests(), new, tmp_path / "out.jsonl", backend=backend)
    assert rows == clean
    out = capsys.readouterr().out
    assert "discarding" in out and "decoding.temperature 0.8 -> 1.5" in out and "resuming" not in out


def test_resume_after_the_model_changed_equals_a_clean_run_of_the_new_model(tmp_path, backend, tiny_model, capsys):
    """evaluate@<arm> after the arm was retrained: the old model's rows must not be reused."""
    cfg = decoding(n=2, max_new_tokens=16, batch_size=3)
    retrained = build_tiny_model(tmp_path / "retrained", seed=1)
    other = TransformersBackend(retrained, dtype=torch.float32)
    clean = generate_jsonl(retrained, requests(), cfg, tmp_path / "clean.jsonl", backend=other)
    interrupted_run(tiny_model, requests(), cfg, tmp_path / "out.jsonl", backend, batches=2)
    assert generate_jsonl(retrained, requests(), cfg, tmp_path / "out.jsonl", backend=other) == clean
    assert "model changed" in capsys.readouterr().out


def test_a_partial_file_without_a_resume_key_is_discarded(tmp_path, backend, tiny_model, capsys):
    cfg = decoding(n=1, max_new_tokens=8, batch_size=2)
    (tmp_path / "out.jsonl.partial").write_text('{"prompt_id": "p0", "sample_index": 0, "text": "stale", "batch": 0}\n')
    rows = generate_jsonl(tiny_model, requests(), cfg, tmp_path / "out.jsonl", backend=backend)
    assert "stale" not in [r["text"] for r in rows]
    assert "no resume key recorded" in capsys.readouterr().out


def test_degenerate_output_is_refused_and_not_written(tmp_path):
    from tasks.core.files import DataError
    from tasks.sampling.generate import check_not_degenerate

    garbage = [{"text": "```" + "-" * 40, "finish_reason": "length"}] * 3
    with pytest.raises(DataError, match="none of the 3 samples ended at EOS"):
        check_not_degenerate(garbage, tmp_path / "s.jsonl")
    check_not_degenerate(garbage + [{"text": "x", "finish_reason": "eos"}], "s.jsonl")  # one healthy row
    check_not_degenerate([{"text": "```python\nx = 1\n```", "finish_reason": "length"}], "s.jsonl")


@pytest.mark.slow
def test_sample_stage_resumes_after_sigkill(tmp_path, tiny_model):
    overrides = {"data": humaneval_only(train=12), "sample": {"n": 2, "batch_size": 2, "max_new_tokens": 64}}
    reference = make_workspace(tmp_path / "ref", tiny_model, overrides)
    killed = make_workspace(tmp_path / "killed", tiny_model, overrides)
    for root in (reference, killed):
        subprocess.run([sys.executable, "-m", "tasks.prepare"], cwd=root, env=stage_env(root), check=True,
                       capture_output=True)
    subprocess.run([sys.executable, "-m", "tasks.sample", "--config", "ssd"], cwd=reference, env=stage_env(reference), check=True,
                   capture_output=True)

    partial = killed / "samples/ssd/samples.jsonl.partial"
    proc = subprocess.Popen([sys.executable, "-m", "tasks.sample", "--config", "ssd"], cwd=killed, env=stage_env(killed),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not partial.exists() or partial.read_text().count("\n") < 6):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = partial.read_text().count("\n")
    assert 6 <= written < 24, "the kill should land mid-run"
    assert not (killed / "samples/ssd/samples.jsonl").exists()

    resumed = subprocess.run([sys.executable, "-m", "tasks.sample", "--config", "ssd"], cwd=killed, env=stage_env(killed),
                             capture_output=True, text=True, check=True)
    assert "resuming" in resumed.stdout
    assert (killed / "samples/ssd/samples.jsonl").read_text() == (reference / "samples/ssd/samples.jsonl").read_text()
