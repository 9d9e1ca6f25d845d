"""A model's architecture, for planning before its weights are here (`selfdistill plan`).

The shape comes from the model's config.json: in a local model dir, else in huggingface_hub's
cache (no download), else from the table of the paper's models shipped with the project
(tasks/data/model_shapes.json, each value with its source). The embedded default is in the
table (its GGUF's metadata). Parameter counts are computed from the shape: embedding, attention
(q, k, v, o with grouped K/V heads), the gated MLP (or the MoE experts and router), the norms,
and the LM head unless it is tied to the embedding.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tasks.core.config import EMBEDDED_MODEL, ParamsError

TABLE = Path(__file__).resolve().parent.parent / "data" / "model_shapes.json"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded GGUF is a quantization of
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
QK_NORM_TYPES = ("qwen3", "qwen3_moe")  # a per-head RMSNorm on queries and keys


@dataclass(frozen=True)
class ModelShape:
    name: str
    source: str  # where the numbers were read
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    intermediate: int  # the dense MLP's width
    context: int  # max_position_embeddings
    tied: bool  # the LM head is the embedding matrix
    dtype: str  # as stored on the hub
    model_type: str = ""
    experts: int = 0  # MoE: experts per layer (0: dense)
    experts_per_token: int = 0
    expert_intermediate: int = 0

    def embedding(self) -> int:
        return self.vocab * self.hidden

    def attention(self) -> int:
        q_and_o = 2 * self.hidden * self.heads * self.head_dim
        k_and_v = 2 * self.hidden * self.kv_heads * self.head_dim
        qk_norm = 2 * self.head_dim if self.model_type in QK_NORM_TYPES else 0
        return q_and_o + k_and_v + qk_norm

    def mlp(self, active: bool = False) -> int:
        """One layer's MLP: gate, up and down projections (of every expert, or of the experts one
        token uses, and the router)."""
        if not self.experts:
            return 3 * self.hidden * self.intermediate
        experts = self.experts_per_token if active else self.experts
        return experts * 3 * self.hidden * self.expert_intermediate + self.hidden * self.experts

    def mlp_width(self) -> int:
        """Intermediate activations one token makes in one layer's MLP (MoE: in its experts)."""
        return self.experts_per_token * self.expert_intermediate if self.experts else self.intermediate

    def parameters(self, active: bool = False) -> int:
        """All parameters (active: those one token's forward uses, the MoE's chosen experts)."""
        per_layer = self.attention() + self.mlp(active) + 2 * self.hidden  # two RMSNorms
        head = 0 if self.tied else self.vocab * self.hidden
        return self.embedding() + self.layers * per_layer + self.hidden + head

    def kv_bytes_per_token(self, bytes_per_value: int) -> int:
        """Keys and values of one token in every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * bytes_per_value

    def describe(self) -> str:
        moe = (f", MoE {self.experts} experts ({self.experts_per_token} per token), "
               f"{self.parameters(active=True) / 1e9:.2f}B active" if self.experts else "")
        return (f"{self.parameters() / 1e9:.2f}B parameters{moe}; {self.layers} layers, hidden {self.hidden}, "
                f"{self.heads} attention / {self.kv_heads} KV heads x {self.head_dim}, intermediate "
                f"{self.expert_intermediate if self.experts else self.intermediate}, vocabulary {self.vocab:,}, "
                f"context {self.context:,}, {'tied' if self.tied else 'untied'} embeddings, {self.dtype}")


def from_config(config: dict, name: str, source: str) -> ModelShape:
    """A shape from the keys of an HF config.json (a multimodal model's text_config if it has one)."""
    config = config.get("text_config") or config
    try:
        heads = config["num_attention_heads"]
        return ModelShape(
            name=name, source=source, layers=config["num_hidden_layers"], hidden=config["hidden_size"], heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads, vocab=config["vocab_size"],
            intermediate=config.get("intermediate_size", 0), context=config.get("max_position_embeddings", 0),
            tied=bool(config.get("tie_word_embeddings", False)),
            dtype=str(config.get("torch_dtype") or config.get("dtype") or "float32"),
            model_type=config.get("model_type", ""),
            experts=config.get("num_experts") or config.get("num_local_experts") or 0,
            experts_per_token=config.get("num_experts_per_tok") or 0,
            expert_intermediate=config.get("moe_intermediate_size") or config.get("intermediate_size", 0))
    except KeyError as err:
        raise ParamsError(f"{source}: config.json has no {err.args[0]!r}: not a decoder this plan knows") from None


def table() -> dict[str, dict]:
    return {name: entry for name, entry in json.loads(TABLE.read_text()).items() if not name.startswith("_")}


def from_table(name: str) -> ModelShape | None:
    """The shipped table's entry for a hub id (or a dir named like one of its models)."""
    entries = table()
    key = next((k for k in entries if k.lower() == name.lower() or k.split("/")[1].lower() == Path(name).name.lower()),
               None)
    if key is None:
        return None
    return from_config(entries[key]["config"], key, f"{TABLE.relative_to(TABLE.parents[2])} ({entries[key]['source']})")


def cached_config(repo_id: str, revision: str | None) -> Path | None:
    """config.json of a hub model in huggingface_hub's cache, if it is there (nothing is downloaded)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except ValueError:  # not a valid repo id (e.g. a path to a dir that is not there)
        return None
    return Path(found) if isinstance(found, str) else None


def model_shape(base: str, revision: str | None = None, workspace: str | Path = ".") -> ModelShape:
    """The shape of `model.base`: a local dir's config.json, the hub cache's, else the shipped table."""
    if base == EMBEDDED_MODEL:
        return from_table(EMBEDDED_HUB_ID)
    local = Path(workspace) / base
    for config in (local / "config.json", cached_config(base, revision)):
        if config is not None and config.is_file():
            return from_config(json.loads(config.read_text()), base, str(config))
    shape = from_table(base)
    if shape is None:
        raise ParamsError(
            f"model.base={base!r}: no config.json (not a local dir, not in the Hugging Face cache) and not one of "
            f"the shipped shapes ({', '.join(table())}); fetch only its config: "
            f"huggingface-cli download {base} config.json")
    return shape
