"""Shared fixtures: a tiny randomly initialised llama with a byte-level tokenizer and a
ChatML chat template, saved as a standard HF dir, so stage tests run real code in seconds."""
from __future__ import annotations

import json
import os
import signal
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_model(out_dir: Path, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    torch.manual_seed(seed)
    model = tiny_llama(len(vocab), max_positions=4096, bos=0, eos=2, pad=0)
    with torch.no_grad():
        # Steer the random model: point the newline and EOS rows of the output layer along the
        # mean final hidden state of chat prompts and what follows them, so samples span
        # several lines, as real answers do, and some finish before max_new_tokens.
        chat = tokenizer.apply_chat_template([{"role": "user", "content": "def f(x):"}], add_generation_prompt=True)
        chat = torch.tensor(chat["input_ids"] if hasattr(chat, "keys") else chat)
        probe = torch.stack([torch.cat([chat, torch.randint(3, len(vocab), (48,))]) for _ in range(8)])
        mean_hidden = model(probe, output_hidden_states=True).hidden_states[-1].mean(dim=(0, 1))
        direction = mean_hidden / mean_hidden.norm() ** 2
        model.lm_head.weight[vocab["Ċ"]] = direction * 4.0
        model.lm_head.weight[vocab["<|im_end|>"]] = direction * 3.0
    return save_tiny(model, tokenizer, out_dir)


def tiny_llama(vocab_size: int, max_positions: int, bos: int | None, eos: int, pad: int):
    """A 2-layer random Llama. head_dim 64 (128 / 2 heads): a shape the continuous backends'
    fused kernels take, as SmolLM2's, so the tests run the kernels."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=max_positions, bos_token_id=bos, eos_token_id=eos,
        pad_token_id=pad, tie_word_embeddings=False))


def save_tiny(model, tokenizer, out_dir: Path) -> Path:
    """Save as an HF model dir, generation config matching the model config's special tokens."""
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(model.config, key))
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


TINY_PROFILE = REPO / "profiles" / "tiny.yaml"


def default_params():
    """params.yaml, the one home of every default."""
    from tasks.core.config import load_params

    return load_params(REPO / "params.yaml")


def decoding(**overrides):
    """params.yaml's `ssd` sampling config with `overrides`, validated (a DecodingConfig)."""
    from tasks.core.config import DecodingConfig, sampling_decoding

    ssd = sampling_decoding(default_params().sample, "ssd")
    return DecodingConfig.model_validate({**{k: getattr(ssd, k) for k in DecodingConfig.model_fields}, **overrides})


def filter_named_arms() -> dict:
    """Param overrides for tests with a dvc.yaml of their own: two arms named after their filters
    (`train@none`, `train@passes`) on params.yaml's `ssd` sampling config alone."""
    ssd = default_params().sample.configs["ssd"].model_dump()
    return {"arms": {"none": {"sample": "ssd", "filter": "none"}, "passes": {"sample": "ssd", "filter": "passes"}},
            "sample": {"configs": {"ssd": ssd}}}


def train_config(**overrides):
    from tasks.core.config import TrainConfig

    return TrainConfig.model_validate({**default_params().train.model_dump(), **overrides})


def write_params(root: Path, profile: Path | None = None, overrides: dict | None = None) -> Path:
    """The project's params.yaml in `root`, with a profile and then `overrides` (sections of
    keys, as in params.yaml; `arms` is replaced whole) applied."""
    from tasks.core.profiles import update_params_file

    path = root / "params.yaml"
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", path)
    overrides = dict(overrides or {})
    pairs = [f"arms={json.dumps(overrides.pop('arms'))}"] if "arms" in overrides else []
    pairs += [f"{section}.{key}={json.dumps(value)}" for section, values in overrides.items()
              for key, value in values.items()]  # JSON is YAML 1.2
    update_params_file(path, pairs, profile=profile)
    return path


def rendered_stages(root: Path) -> dict[str, dict]:
    """dvc.yaml's stages as DVC renders them for `root`'s params.yaml (foreach expanded): stage
    name -> {"cmd", "deps" (paths), "params" (keys)}."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {stage.addressing: {
            "cmd": stage.cmd,
            "deps": [d.def_path for d in stage.deps if not isinstance(d, ParamsDependency)],
            "params": [key for d in stage.deps if isinstance(d, ParamsDependency) for key in d.params],
        } for stage in repo.index.stages}


def init_repo(root: Path) -> Path:
    """Make `root` a git + DVC repo and commit what it holds."""
    root.mkdir(parents=True, exist_ok=True)
    run = lambda *cmd: subprocess.run(cmd, cwd=root, check=True, capture_output=True, text=True)  # noqa: E731
    run("git", "init", "-q")
    run("git", "config", "user.email", "test@selfdistill.invalid")
    run("git", "config", "user.name", "selfdistill test")
    run(sys.executable, "-m", "dvc", "init", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "workspace")
    return root


def make_workspace(root: Path, model_dir: Path, overrides: dict | None = None) -> Path:
    """A git + DVC repo holding the project's pipeline files, params.yaml with the tiny profile
    applied and `model.base` set to `model_dir`."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "tasks", "problems", "requirements", ".dvcignore"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, root / name)
    write_params(root, TINY_PROFILE, {"model": {"base": str(model_dir)}, **(overrides or {})})
    return init_repo(root)


def humaneval_only(train: int, eval: int = 4) -> dict:
    """Data overrides for a workspace whose stages run by hand without the `codeio` stage."""
    return {"train": {"source": "humaneval", "max_problems": train},
            "validation": {"source": "humaneval", "max_problems": 2},
            "eval": [{"name": "humaneval", "source": "humaneval", "max_problems": eval}]}


def stop_process_group(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM a process started with start_new_session=True and its children; SIGKILL after
    `timeout` seconds."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def stage_env(root: Path) -> dict:
    """Environment for running stages in a workspace: its own copy of tasks/ comes first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


class Interrupted(Exception):
    pass


def interrupted_run(model_dir, requests, cfg, out_path: Path, backend, batches: int) -> Path:
    """Run generate_jsonl and stop it, as a kill would, after `batches` batches: the real partial
    file it leaves (its resume key first, then the finished batches)."""
    from tasks.core.paths import partial_of
    from tasks.sampling.generate import generate_jsonl

    class Stopping:
        def __init__(self):
            self.calls = 0

        def __getattr__(self, name):
            return getattr(backend, name)

        def generate_batch(self, *args, **kwargs):
            if self.calls == batches:
                raise Interrupted
            self.calls += 1
            return backend.generate_batch(*args, **kwargs)

    with pytest.raises(Interrupted):
        generate_jsonl(model_dir, requests, cfg, out_path, backend=Stopping())
    partial = partial_of(out_path)
    assert partial.exists() and not out_path.exists()
    return partial
