"""The training library (tasks/training/sft.py): packing keeps examples apart, the lean loss
is the full loss, the schedule and optimizer are the paper's settings from params."""
from __future__ import annotations

import itertools

import pytest
import torch

from conftest import train_config
from tasks.core.config import ParamsError
from tasks.training.sft import (IGNORE, Collator, LinearCrossEntropy, answer_loss_sum, build_trainer,
                                check_against_reference, encode, trim_heap_per_layer, use_packed_attention)


def tiny_examples(tokenizer, n=4):
    rows = [[{"role": "user", "content": f"question {i} " * (i + 1)},
             {"role": "assistant", "content": f"answer {i}\n" * (3 - i % 3)}] for i in range(n)]
    return [encode(tokenizer, r, max_length=512) for r in rows]


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval(), AutoTokenizer.from_pretrained(tiny_model)


def features(examples):
    return [{"input_ids": ids, "labels": labels} for ids, labels in examples]


@pytest.mark.parametrize("lean", [True, False])
def test_packed_loss_equals_unpacked_loss(tiny, lean):
    model, tok = tiny
    feats = features(tiny_examples(tok))
    packed = Collator(tok.pad_token_id, pack=True)(feats)
    padded = Collator(tok.pad_token_id, pack=False)(feats)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    assert packed["position_ids"][0].tolist() == [p for f in feats for p in range(len(f["input_ids"]))]
    with torch.no_grad():
        loss_p, n_p = answer_loss_sum(model, packed, lean=lean)
        loss_u, n_u = answer_loss_sum(model, padded, lean=lean)
    assert n_p == n_u == sum(sum(l != IGNORE for l in f["labels"][1:]) for f in feats)
    assert loss_p.item() == pytest.approx(loss_u.item(), rel=1e-5)


@pytest.mark.parametrize("lean", [True, False])
def test_rows_capped_at_pack_tokens_give_the_unpacked_loss(tiny, lean):
    # A cap that splits the micro-batch into several rows, one of them padded with a block of its own.
    model, tok = tiny
    feats = features(tiny_examples(tok, 5))
    lengths = sorted((len(f["input_ids"]) for f in feats), reverse=True)
    cap = lengths[0] + lengths[-1]
    collate = Collator(tok.pad_token_id, pack=True, row_tokens=cap)
    rows = collate.rows(feats)
    assert 1 < len(rows) < len(feats) and all(sum(len(f["input_ids"]) for f in r) <= cap for r in rows)
    assert sorted(id(f) for r in rows for f in r) == sorted(id(f) for f in feats)
    packed = collate(feats)
    assert packed["input_ids"].shape[0] == len(rows) and "attention_mask" not in packed
    assert (packed["input_ids"] == tok.pad_token_id).any()  # the shorter rows are padded
    with torch.no_grad():
        loss_p, n_p = answer_loss_sum(model, packed, lean=lean)
        loss_u, n_u = answer_loss_sum(model, Collator(tok.pad_token_id, pack=False)(feats), lean=lean)
    assert n_p == n_u
    assert loss_p.item() == pytest.approx(loss_u.item(), rel=1e-5)


def test_packing_keeps_attention_inside_each_example(tiny):
    # Changing the first example must not change the second example's loss when packed.
    model, tok = tiny
    feats = features(tiny_examples(tok, 2))
    other = features(tiny_examples(tok, 3))[2:] + feats[1:]
    collate = Collator(tok.pad_token_id, pack=True)
    alone = Collator(tok.pad_token_id, pack=False)(feats[1:])
    with torch.no_grad():
        second = answer_loss_sum(model, alone)[0] - 0
        a = answer_loss_sum(model, collate(feats))[0] - answer_loss_sum(model, collate(feats[:1]))[0]
        b = answer_loss_sum(model, collate(other))[0] - answer_loss_sum(model, collate(other[:1]))[0]
    assert a.item() == pytest.approx(second.item(), rel=1e-4) and b.item() == pytest.approx(second.item(), rel=1e-4)


def test_lean_loss_equals_full_vocab_loss(tiny):
    model, tok = tiny
    feats = features(tiny_examples(tok))
    for pack, cap in ((True, 0), (True, 40), (False, 0)):
        batch = Collator(tok.pad_token_id, pack=pack, row_tokens=cap)(feats)
        with torch.no_grad():
            assert answer_loss_sum(model, batch, lean=True)[0].item() == pytest.approx(
                answer_loss_sum(model, batch, lean=False)[0].item(), rel=1e-5)


def test_chunked_linear_cross_entropy_has_the_full_logits_loss_and_gradients():
    torch.manual_seed(0)
    hidden, weight = torch.randn(37, 16, dtype=torch.float64), torch.randn(50, 16, dtype=torch.float64)
    target = torch.randint(0, 50, (37,))
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    reference = torch.nn.functional.cross_entropy(h1 @ w1.T, target, reduction="sum")
    (0.5 * reference).backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ours = LinearCrossEntropy.apply(h2, w2, target, 8)  # 5 chunks, the last one short
    (0.5 * ours).backward()
    assert ours.item() == pytest.approx(reference.item(), rel=1e-6)
    assert torch.allclose(h2.grad, h1.grad, rtol=1e-6, atol=1e-9) and torch.allclose(w2.grad, w1.grad, rtol=1e-6, atol=1e-9)
    with torch.no_grad():  # scoring: no gradient work, same loss
        assert LinearCrossEntropy.apply(hidden, weight, target, 8).item() == pytest.approx(reference.item(), rel=1e-6)


@pytest.mark.parametrize("split", [False, True])
def test_packed_attention_gives_the_unpacked_loss_and_gradients(tiny, split):
    # Per-example SDPA on packed rows (one row, or rows of two examples and a padded one) against
    # SDPA with an attention mask on the padded micro-batch: same loss, same gradients.
    model, tok = tiny
    feats = features(tiny_examples(tok, 5))
    lengths = sorted(len(f["input_ids"]) for f in feats)
    cap = lengths[-1] + lengths[0] if split else 0

    def loss_and_grads(batch):
        model.zero_grad()
        loss, n = answer_loss_sum(model, batch)
        (loss / n).backward()
        return loss.item(), {k: p.grad.clone() for k, p in model.named_parameters()}

    reference, ref_grads = loss_and_grads(Collator(tok.pad_token_id, pack=False)(feats))
    before = use_packed_attention(model)
    try:
        packed, grads = loss_and_grads(Collator(tok.pad_token_id, pack=True, row_tokens=cap)(feats))
    finally:
        model.set_attn_implementation(before)
        model.zero_grad(set_to_none=True)
    assert packed == pytest.approx(reference, rel=1e-5)
    assert all(torch.allclose(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6) for k in ref_grads)


def test_the_stage_refuses_a_model_whose_loss_its_shortcuts_would_get_wrong(tiny_model):
    # Logit soft-capping after the LM head (Gemma 2 does it): the chunked LM-head loss would skip it.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    pad_id = AutoTokenizer.from_pretrained(tiny_model).pad_token_id
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30)  # logits of a trained model's size, not ~0.1
    cfg = train_config(packing=True, lean_loss=True, pack_tokens=0)
    before = use_packed_attention(model)
    check_against_reference(model, pad_id, cfg, before)  # a plain causal LM passes

    def soft_cap(module, args, kwargs, output):
        output.logits = 3.0 * torch.tanh(output.logits / 3.0)
        return output

    model.register_forward_hook(soft_cap, with_kwargs=True)
    with pytest.raises(ParamsError, match="train.lean_loss"):
        check_against_reference(model, pad_id, cfg, before)
    check_against_reference(model, pad_id, train_config(packing=True, lean_loss=False), before)


def test_the_lean_loss_is_refused_where_accelerate_shards_the_lm_head(tiny, tmp_path, monkeypatch):
    from tasks.training.sft import fit

    model, tok = tiny
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ParamsError, match="train.lean_loss: false"):
        fit(model, tok, tiny_examples(tok), train_config(lean_loss=True), tmp_path, {}, "t")
    assert not (tmp_path / "resume_key.json").exists()


def test_heap_trim_hooks_every_decoder_layer(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids = torch.arange(1, 20)[None]
    with torch.no_grad():
        before = model(ids).logits
        assert trim_heap_per_layer(model) == model.config.num_hidden_layers
        assert torch.equal(model(ids).logits, before)  # the hooks leave the computation alone


def test_trainer_uses_the_papers_optimizer_and_schedule(tiny, tmp_path):
    model, tok = tiny
    cfg = train_config(lr=1e-4, min_lr=1e-5, warmup_steps=4, beta1=0.9, beta2=0.95, weight_decay=0.1,
                       micro_batch_size=1, grad_accum=1, epochs=5, bf16=False)
    trainer = build_trainer(model, tok, tiny_examples(tok), cfg, tmp_path)
    trainer.create_optimizer_and_scheduler(num_training_steps=20)
    opt, sched = trainer.optimizer, trainer.lr_scheduler
    assert opt.defaults["betas"] == (0.9, 0.95)
    decays = {g["weight_decay"] for g in opt.param_groups}
    assert decays == {0.1, 0.0}  # norms (and biases) without weight decay
    lrs = []
    for _ in range(21):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[4] == pytest.approx(1e-4) and lrs[:4] == sorted(lrs[:4]) and lrs[0] < 1e-4
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))
    assert lrs[20] == pytest.approx(1e-5)


def test_data_order_is_seeded(tiny, tmp_path):
    model, tok = tiny
    examples = tiny_examples(tok, 8)

    def order(seed):
        cfg = train_config(micro_batch_size=2, grad_accum=1, seed=seed, packing=False)
        loader = build_trainer(model, tok, examples, cfg, tmp_path / str(seed)).get_train_dataloader()
        return [tuple(b["input_ids"][:, 0].tolist() + [b["input_ids"].shape[1]]) for b in loader]

    assert order(0) == order(0) != order(1)


def test_resume_only_from_a_complete_checkpoint_of_the_same_run(tiny, tmp_path, capsys):
    from tasks.core.files import resume_key
    from tasks.training.sft import find_resume

    model, tok = tiny
    cfg = train_config(bf16=False)
    out = tmp_path / "ckpt"
    trainer = build_trainer(model, tok, tiny_examples(tok), cfg, out)
    key = resume_key(data="a", train=cfg.model_dump())
    assert find_resume(trainer, out, key, "t") is None  # nothing there yet; the key is recorded
    (out / "checkpoint-2").mkdir()
    (out / "checkpoint-2/complete").write_text("")
    (out / "checkpoint-4").mkdir()  # killed mid-save: no marker
    assert find_resume(trainer, out, key, "t") == str(out / "checkpoint-2")
    other = resume_key(data="a", train={**cfg.model_dump(), "lr": 1.0})
    assert find_resume(trainer, out, other, "t") is None
    printed = capsys.readouterr().out
    assert "discarding the checkpoint" in printed and "train.lr" in printed and not (out / "checkpoint-2").exists()


# MULTI_GPU + use_cpu: torchrun's launcher, gloo on the CPU (MULTI_CPU wants mpirun).
TWO_CPU_PROCESSES = ("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_machines: 1\n"
                     "num_processes: 2\nmachine_rank: 0\nmain_training_function: main\nmixed_precision: 'no'\n"
                     "use_cpu: true\n")


@pytest.mark.slow
def test_a_launched_process_failing_for_good_fails_the_stage_for_good(tmp_path):
    """Under `accelerate launch` the launcher exits 1 whatever failed; a process that ended with
    EXIT_NO_RETRY (here: no samples to train on) makes the stage exit with it too, so the flow
    does not retry what a rerun would repeat."""
    import shutil
    import subprocess
    import sys

    from conftest import REPO, stage_env, write_params
    from tasks.core.config import EXIT_NO_RETRY

    root = tmp_path / "ws"
    config = tmp_path / "accelerate.yaml"
    config.write_text(TWO_CPU_PROCESSES)
    shutil.copytree(REPO / "tasks", root / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    write_params(root, None, {"train": {"accelerate": str(config)}})
    (root / "filtered/ssd-none").mkdir(parents=True)
    (root / "filtered/ssd-none/train.jsonl").write_text("")
    done = subprocess.run([sys.executable, "-m", "tasks.train", "--arm", "ssd-none"], cwd=root, env=stage_env(root),
                          capture_output=True, text=True, timeout=300)
    assert "accelerate.commands.launch" in done.stdout
    assert done.returncode == EXIT_NO_RETRY, (done.returncode, done.stdout[-2000:] + done.stderr[-3000:])
    assert "has 0 samples to train on" in done.stderr


@pytest.mark.slow
def test_stage_runs_two_processes_under_accelerate(tmp_path, tiny_model):
    """`train.accelerate` relaunches the stage under `accelerate launch` (here 2 CPU processes,
    gloo; on GPUs the same config file with FSDP / DeepSpeed), and 2 processes x micro-batch 2
    train the weights 1 process x micro-batch 2 x accumulation 2 trains."""
    import json
    import shutil
    import subprocess
    import sys

    from conftest import REPO, stage_env, write_params

    config = tmp_path / "accelerate.yaml"
    config.write_text(TWO_CPU_PROCESSES)
    rows = [{"finish_reason": "eos",
             "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}\n" * 3}]}
            for i in range(8)]

    def train(root, **overrides):
        shutil.copytree(REPO / "tasks", root / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
        # lr 1e-3: a step that moves the weights well past float noise, so a wrong gradient shows.
        write_params(root, None, {"train": {"epochs": 1, "micro_batch_size": 2, "bf16": False, "max_length": 256,
                                            "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 0, **overrides}})
        shutil.copytree(tiny_model, root / "models/base")
        (root / "models/base/source.json").write_text(json.dumps({"base": "tiny"}))
        (root / "filtered/ssd-none").mkdir(parents=True)
        (root / "filtered/ssd-none/train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        done = subprocess.run([sys.executable, "-m", "tasks.train", "--arm", "ssd-none"], cwd=root,
                              env=stage_env(root), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        return done

    root = tmp_path / "ws"
    done = train(root, accelerate=str(config), grad_accum=1)
    assert "accelerate.commands.launch" in done.stdout
    curve = (root / "train/ssd-none/live/plots/metrics/loss.tsv").read_text().splitlines()
    assert [int(line.split("\t")[0]) for line in curve[1:]] == [1, 2]  # 8 examples / (2 per micro-batch x 2 processes)
    train(tmp_path / "one", grad_accum=2)
    from safetensors.torch import load_file

    two, one = (load_file(r / "models/ssd-none/model.safetensors") for r in (root, tmp_path / "one"))
    base = load_file(tiny_model / "model.safetensors")
    assert two.keys() == one.keys()
    assert any(not torch.equal(one[name], base[name]) for name in one)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
    assert (root / "models/ssd-none/generation_config.json").exists() and (root / "models/ssd-none/README.md").exists()


def one_optimizer_step(tiny_model, examples, tokenizer, out, **overrides):
    """(logged loss, gradients as the optimizer sees them, unclipped) of a run of one step."""
    from transformers import AutoModelForCausalLM, TrainerCallback

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa")
    cfg = train_config(epochs=1, bf16=False, warmup_steps=0, checkpoint_every=100, **overrides)
    if cfg.packing:
        use_packed_attention(model)
    trainer = build_trainer(model, tokenizer, examples, cfg, out)
    trainer.args.max_grad_norm = 0.0  # the gradients as computed: clipping would hide a scale error
    grads = {}

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    trainer.add_callback(Grab())
    trainer.train()
    assert trainer.state.global_step == 1
    return trainer.state.log_history[0]["loss"], grads


@pytest.mark.parametrize("packing", [True, False])
def test_gradient_accumulation_gives_the_large_micro_batchs_step(tiny_model, tiny, tmp_path, packing):
    """One optimizer step over 4 examples: micro-batch 2 x accumulation 2 has the loss and the
    gradients of micro-batch 4 x accumulation 1 (the loss is normalized over the step's answer
    tokens, not per micro-batch)."""
    _, tok = tiny
    examples = tiny_examples(tok, 4)
    loss_4x1, grads_4x1 = one_optimizer_step(tiny_model, examples, tok, tmp_path / "4x1", micro_batch_size=4,
                                             grad_accum=1, packing=packing)
    loss_2x2, grads_2x2 = one_optimizer_step(tiny_model, examples, tok, tmp_path / "2x2", micro_batch_size=2,
                                             grad_accum=2, packing=packing)
    assert loss_2x2 == pytest.approx(loss_4x1, rel=1e-5)
    assert grads_2x2.keys() == grads_4x1.keys() and len(grads_4x1) > 5
    for name, grad in grads_4x1.items():
        torch.testing.assert_close(grads_2x2[name], grad, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("config, own_port", [("num_machines: 1\nnum_processes: 2\n", True),
                                              ("num_processes: 2\n", True),
                                              ("num_machines: 1\nmain_process_port: 29555\n", False),
                                              ("num_machines: 2\nmain_process_ip: 10.0.0.1\n", False)])
def test_a_one_machine_launch_takes_a_free_port_of_its_own(tmp_path, config, own_port):
    """torchrun's default port would make two multi-process train stages at once on one machine
    collide: a one-machine config without a port of its own gets a free one; a config's own port,
    or several machines' (they must agree on one), is left to the config."""
    import socket

    from tasks.train import launch_command

    path = tmp_path / "accelerate.yaml"
    path.write_text(config)
    cmd = launch_command(str(path), "ssd-none")
    assert cmd[-4:] == ["-m", "tasks.train", "--arm", "ssd-none"] and cmd[cmd.index("--config_file") + 1] == str(path)
    assert ("--main_process_port" in cmd) == own_port
    if own_port:
        with socket.socket() as s:
            s.bind(("127.0.0.1", int(cmd[cmd.index("--main_process_port") + 1])))  # free
