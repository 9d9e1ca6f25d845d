"""The sampling loop and the `sample` stage: semantics, determinism, resume after SIGKILL."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, build_tiny_model, decoding, humaneval_only, interrupted_run, make_workspace, stage_env
from tasks.sampling.backend_transformers import TransformersBackend
from tasks.sampling.generate import Request, discard_partials, generate_jsonl


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
    assert (tmp_path / "s.jsonl.partial").exists()  # complete: a rerun of the stage reuses it
    discard_partials(tmp_path / "s.jsonl")  # as the stage does once it has finished
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


def swept(temperatures=(0.5, 0.9, 1.3), count=3):
    """A T_eval sweep as one run: each prompt at every T, a request each, next to each other."""
    return [Request({"prompt_id": r.key["prompt_id"], "T": t}, r.messages, t) for r in requests(count)
            for t in temperatures]


def test_a_run_of_requests_with_their_own_temperatures_decodes_each_at_its_t(tmp_path, backend, tiny_model):
    """Each row is the one its batch (same prompts, same seed) decodes with every row at the row's T."""
    from tasks.core.paths import partial_of

    calls = []

    class Recording:
        def __getattr__(self, name):
            return getattr(backend, name)

        def generate_batch(self, prompts, cfg, seed, progress=None, temperatures=None):
            calls.append((prompts, seed, temperatures))
            return backend.generate_batch(prompts, cfg, seed, progress, temperatures)

    cfg = decoding(n=2, max_new_tokens=16, batch_size=5)
    rows = generate_jsonl(tiny_model, swept(), cfg, tmp_path / "s.jsonl", backend=Recording())
    assert [(r["prompt_id"], r["T"], r["sample_index"]) for r in rows] == \
        [(f"p{i}", t, s) for i in range(3) for t in (0.5, 0.9, 1.3) for s in range(2)]
    assert len(calls) == 4  # 18 units, 5 a batch
    written = [json.loads(line) for line in partial_of(tmp_path / "s.jsonl").read_text().splitlines()[1:]]
    for b, (prompts, seed, temperatures) in enumerate(calls):
        in_batch = [r for r in written if r["batch"] == b]  # in the batch's order
        assert [r["T"] for r in in_batch] == temperatures
        for t in set(temperatures):
            at_t = backend.generate_batch(prompts, cfg.model_copy(update={"temperature": t}), seed)
            assert [r["text"] for r in in_batch if r["T"] == t] == \
                [out.text for out, row_t in zip(at_t, temperatures) if row_t == t]


def test_a_run_with_own_temperatures_resumes_exactly_and_its_key_holds_them(tmp_path, backend, tiny_model, capsys):
    cfg = decoding(n=2, max_new_tokens=16, batch_size=4)
    full = generate_jsonl(tiny_model, swept(), cfg, tmp_path / "full.jsonl", backend=backend)
    interrupted_run(tiny_model, swept(), cfg, tmp_path / "resumed.jsonl", backend, batches=2)
    assert generate_jsonl(tiny_model, swept(), cfg, tmp_path / "resumed.jsonl", backend=backend) == full
    assert "resuming, 8 of 18 completions already written" in capsys.readouterr().out
    # Another sweep (one T changed, the same keys) is another run: its partial work is not reused.
    other = [Request(r.key, r.messages, 1.1 if r.temperature == 1.3 else r.temperature) for r in swept()]
    interrupted_run(tiny_model, swept(), cfg, tmp_path / "other.jsonl", backend, batches=2)
    clean = generate_jsonl(tiny_model, other, cfg, tmp_path / "clean.jsonl", backend=backend)
    assert generate_jsonl(tiny_model, other, cfg, tmp_path / "other.jsonl", backend=backend) == clean
    out = capsys.readouterr().out
    assert "discarding" in out and "prompts changed" in out and "resuming" not in out


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


def kill_dvc_repro_when(root, target: str, partials: str, lines: int) -> int:
    """Start `dvc repro TARGET` and SIGKILL it (DVC and the stage it runs) once the partial files
    matching `partials` hold `lines` lines; the lines they held."""
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", target], cwd=root, env=stage_env(root),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def written() -> int:
        return sum(p.read_text().count("\n") for p in root.glob(partials))

    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and written() < lines:
        time.sleep(0.05)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return written()


@pytest.mark.slow
def test_sample_and_evaluate_resume_under_dvc_repro_after_sigkill(tmp_path, tiny_model):
    """DVC deletes a stage's outs before it runs it: partial work lives under checkpoints/, so a
    `dvc repro` killed mid-stage resumes there, and the outputs equal an uninterrupted run's."""
    overrides = {"data": humaneval_only(train=12), "sample": {"n": 2, "batch_size": 2, "max_new_tokens": 64},
                 "evaluate": {"batch_size": 2}}
    reference = make_workspace(tmp_path / "ref", tiny_model, overrides)
    killed = make_workspace(tmp_path / "killed", tiny_model, overrides)
    for root in (reference, killed):
        subprocess.run([sys.executable, "-m", "dvc", "repro", "model", "prepare"], cwd=root, env=stage_env(root), check=True,
                       capture_output=True)
    subprocess.run([sys.executable, "-m", "dvc", "repro", "sample@ssd", "evaluate@base"], cwd=reference,
                   env=stage_env(reference), check=True, capture_output=True)

    written = kill_dvc_repro_when(killed, "sample@ssd", "checkpoints/partial/samples/ssd/*.partial", 6)
    assert 6 <= written < 24, "the kill should land mid-stage"
    assert not (killed / "samples/ssd/samples.jsonl").exists()
    written = kill_dvc_repro_when(killed, "evaluate@base", "checkpoints/partial/eval/base/samples/**/*.partial", 4)
    assert written >= 4 and not (killed / "eval/base/metrics.json").exists(), "the kill should land mid-stage"
    # ... in the T_eval sweep's one pass (every swept T of every validation prompt): the unit resumed.
    assert (killed / "checkpoints/partial/eval/base/samples/validation.partial").exists()

    for target in ("sample@ssd", "evaluate@base"):
        resumed = subprocess.run([sys.executable, "-m", "dvc", "repro", target], cwd=killed, env=stage_env(killed),
                                 capture_output=True, text=True)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resuming" in resumed.stdout, resumed.stdout[-3000:]
    same = ["samples/ssd/samples.jsonl", *(str(p.relative_to(reference)) for p in (reference / "eval/base").rglob("*.jsonl"))]
    assert len(same) > 3
    for rel in same:
        assert (killed / rel).read_text() == (reference / rel).read_text(), rel
    reference_metrics = json.loads((reference / "eval/base/metrics.json").read_text())
    assert json.loads((killed / "eval/base/metrics.json").read_text())["sets"] == reference_metrics["sets"]
    assert not list((killed / "checkpoints/partial").rglob("*.partial")), "a finished stage leaves no partial work"


@pytest.mark.slow
def test_an_evaluate_pass_over_several_files_resumes_exactly(tmp_path, monkeypatch, tiny_model):
    """`evaluate` decodes several sample files in one pass (the T_eval sweep; every test set at a
    seed): killed after a batch, it resumes, and each file holds the rows of an uninterrupted
    pass, ordered by problem then sample index, in the layout each file always had."""
    from pathlib import Path

    from conftest import Interrupted
    from tasks import evaluate as stage
    from tasks.core import paths
    from tasks.core.config import load_params
    from tasks.core.files import read_jsonl

    root = make_workspace(tmp_path / "ws", tiny_model, {"data": humaneval_only(train=2, eval=3)})
    for module in ("tasks.model", "tasks.prepare"):
        subprocess.run([sys.executable, "-m", module], cwd=root, env=stage_env(root), check=True, capture_output=True)
    monkeypatch.chdir(root)
    params = load_params()
    validation, tests = read_jsonl(paths.VALIDATION_PROBLEMS), read_jsonl(paths.eval_problems("humaneval"))
    cfg = params.evaluate.model_copy(update={"batch_size": 4})

    def the_pass(name):
        return stage.Pass("pass", [stage.Output(paths.validation_samples(name, t), validation, t) for t in (0.5, 0.9, 1.3)]
                          + [stage.Output(paths.eval_samples(name, "humaneval"), tests, 0.7)], 0.9, cfg.seed, name)

    backend = TransformersBackend(root / "models/base", dtype=torch.float32)
    full = stage.answer_and_check(backend, "models/base", the_pass("full"), "full", cfg, params.sandbox)
    run = paths.eval_pass("killed", "pass")
    calls = []

    class KilledAfterABatch:
        def __getattr__(self, name):
            return getattr(backend, name)

        def generate_batch(self, *args, **kwargs):
            if calls:
                raise Interrupted
            calls.append(kwargs.get("temperatures"))
            return backend.generate_batch(*args, **kwargs)

    with pytest.raises(Interrupted):
        stage.answer_and_check(KilledAfterABatch(), "models/base", the_pass("killed"), "killed", cfg, params.sandbox)
    assert calls[0] and len(set(calls[0])) > 1, "a batch holds several T, each row's its own"
    assert paths.partial_of(run).read_text().count("\n") == 1 + 4
    resumed = stage.answer_and_check(backend, "models/base", the_pass("killed"), "killed", cfg, params.sandbox)
    assert resumed == full
    for ours, theirs, out in zip(the_pass("killed").outputs, the_pass("full").outputs, full):
        assert Path(ours.path).read_text() == Path(theirs.path).read_text()
        assert [(r["task_id"], r["sample_index"]) for r in out] == \
            [(p["task_id"], s) for p in ours.problems for s in range(cfg.n)]
        assert set(out[0]) == {"task_id", "sample_index", "messages", "text", "num_tokens", "finish_reason",
                               "extractable", "passed", "result"}
    assert sorted(str(p.relative_to(root / "eval/killed")) for p in (root / "eval/killed").rglob("*.jsonl")) == \
        ["samples/humaneval.jsonl", "samples/validation/T0.5.jsonl", "samples/validation/T0.9.jsonl",
         "samples/validation/T1.3.jsonl"]


KEY_OF_A_LOADED_BACKEND = """
import json, sys
from tasks.sampling.backends import load_backend
from tasks.sampling.generate import code_version
load_backend("transformers", sys.argv[1])
print(json.dumps(code_version()))
"""


def test_the_sampling_key_counts_the_backend_it_loaded_not_the_others(tmp_path, tiny_model):
    """Editing a backend the run does not load keeps its partial work (same key); editing the
    one it loads does not."""
    root = tmp_path / "code"
    shutil.copytree(REPO / "tasks", root / "tasks", ignore=shutil.ignore_patterns("__pycache__"))

    def key() -> dict:
        proc = subprocess.run([sys.executable, "-c", KEY_OF_A_LOADED_BACKEND, str(tiny_model)], cwd=root,
                              env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, check=True)
        return json.loads(proc.stdout.splitlines()[-1])

    def edit(rel: str) -> None:
        path = root / rel
        path.write_text(path.read_text() + "# edited\n")

    before = key()
    assert {"tasks/sampling/generate.py", "tasks/sampling/backends.py",
            "tasks/sampling/backend_transformers.py"} <= set(before["files"])
    assert "tasks/sampling/backend_ctranslate2.py" not in before["files"]
    assert {"torch", "transformers"} <= set(before["engines"])
    edit("tasks/sampling/backend_ctranslate2.py")
    assert key() == before
    edit("tasks/sampling/backend_transformers.py")
    after = key()
    assert after["files"]["tasks/sampling/backend_transformers.py"] != before["files"]["tasks/sampling/backend_transformers.py"]
