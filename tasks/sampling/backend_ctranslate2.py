"""CTranslate2 sampling backends: `ctranslate2` (int8 weights and GEMMs) and
`ctranslate2-float32` (the HF weights unchanged).

Both sample from a conversion made by `selfdistill convert` (tasks/sampling/convert_ctranslate2.py),
checked against the HF dir's fingerprint. Semantics, as the reference backend's:

- prompts are the token ids `encode_chat` made with the model's chat template;
- CTranslate2's sampler restricts to the top-k logits, divides by the temperature, masks
  outside the top-p nucleus (the smallest set of most probable tokens whose mass reaches
  top_p, the crossing token kept, as transformers and vLLM do) and draws from the rest:
  the same distribution as temperature -> top-k -> top-p, since temperature does not change
  the ranking. temperature 0 is greedy. CTranslate2 has no min-p: a config with min_p > 0 is
  rejected with an error that names the key, never sampled differently;
- finished sequences leave the batch; generation stops at any of the model's EOS ids or
  after max_new_tokens; an EOS counts in num_tokens, as in the reference backend;
- seeds: CTranslate2's random generator lives in its worker thread and is seeded once, when
  that thread first samples, so reseeding a running generator does nothing. Each batch
  therefore gets a fresh generator created right after `set_random_seed(seed)`: a batch's
  samples depend only on (prompts, config, seed), which keeps generate_jsonl's resume exact.
  Loading costs ~1 s per batch for the 135M default (int8), small next to the batch itself;
- a temperature per row (`temperatures`): CTranslate2 takes one sampling temperature per call,
  so the batch runs as one call per distinct T, in order of first appearance, each with a fresh
  generator; a batch of one T is one call seeded `seed`, further T's calls are seeded from
  (seed, their first row). A row's draw depends on the rows of its T in the batch, as any CT2
  row depends on its batch: the batch still depends only on (prompts, config, T's, seed).
"""
from __future__ import annotations

import os
from pathlib import Path

from tasks.core.config import DecodingConfig, ParamsError
from tasks.core.modeling import chat_token_ids, eos_token_ids
from tasks.sampling.backends import Completion, check_supported, sequence_seed


class CT2Backend:
    name = "ctranslate2"
    quantization = "int8"  # weights stored and GEMMs run in int8 (per-row scales)
    compute_type = "int8_float32"

    def __init__(self, model_dir: str | Path, threads: int | None = None):
        import ctranslate2  # noqa: F401  (fail here, not at the first batch, if it is missing)
        from transformers import AutoTokenizer

        from tasks.sampling.convert_ctranslate2 import resolve

        self.model_dir = resolve(model_dir, self.quantization)
        hf_dir = self.model_dir / "hf"
        self.tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        if self.tokenizer.chat_template is None:
            raise ParamsError(f"{hf_dir}: the tokenizer has no chat template")
        self.eos = eos_token_ids(hf_dir, self.tokenizer)
        self.threads = threads or max(1, os.cpu_count() or 1)
        # The model files, read once; every batch's fresh generator loads from memory.
        self._files = {p.name: p.read_bytes() for p in self.model_dir.iterdir()
                       if p.name in ("model.bin", "config.json", "vocabulary.json", "vocabulary.txt",
                                     "vocab.json", "shared_vocabulary.json", "shared_vocabulary.txt")}

    def encode_chat(self, messages: list) -> list[int]:
        return chat_token_ids(self.tokenizer, messages)

    def _generator(self, seed: int):
        import ctranslate2

        ctranslate2.set_random_seed(seed % (1 << 32))
        return ctranslate2.Generator(str(self.model_dir), device="cpu", compute_type=self.compute_type,
                                     inter_threads=1, intra_threads=self.threads, files=self._files)

    def generate_batch(self, prompts: list[list[int]], cfg: DecodingConfig, seed: int,
                       progress=None, temperatures: list[float] | None = None) -> list[Completion]:
        # `progress` is not called: this engine has no per-step hook.
        if temperatures is None:
            return self._generate(prompts, cfg, seed)
        groups: dict[float, list[int]] = {}
        for i, t in enumerate(temperatures):
            groups.setdefault(t, []).append(i)
        out: list[Completion] = [None] * len(prompts)  # type: ignore[list-item]
        for g, (t, rows) in enumerate(groups.items()):
            done = self._generate([prompts[i] for i in rows], cfg.model_copy(update={"temperature": t}),
                                  seed if g == 0 else sequence_seed(seed, rows[0]))
            for i, completion in zip(rows, done):
                out[i] = completion
        return out

    def _generate(self, prompts: list[list[int]], cfg: DecodingConfig, seed: int) -> list[Completion]:
        check_supported(cfg, self.name)
        greedy = cfg.temperature == 0
        generator = self._generator(seed)
        try:
            results = generator.generate_batch(
                [self.tokenizer.convert_ids_to_tokens(p) for p in prompts],
                max_length=cfg.max_new_tokens,
                include_prompt_in_result=False,
                end_token=self.eos,
                return_end_token=True,
                beam_size=1,
                sampling_topk=1 if greedy else cfg.top_k,  # 0: the whole vocabulary
                sampling_topp=1.0 if greedy else cfg.top_p,
                sampling_temperature=1.0 if greedy else cfg.temperature,
            )
        finally:
            del generator
        out = []
        for result in results:
            ids = list(result.sequences_ids[0])
            finish = "eos" if ids and ids[-1] in self.eos else "length"
            text_ids = ids[:-1] if finish == "eos" else ids
            out.append(Completion(self.tokenizer.decode(text_ids, skip_special_tokens=True), len(ids), finish,
                                  tuple(text_ids)))
        return out

    def teacher_forced_ranks(self, ids: list[int], start: int) -> list[int]:
        import numpy as np

        generator = self._generator(0)
        try:
            logits = np.asarray(generator.forward_batch([self.tokenizer.convert_ids_to_tokens(ids)]))[0]
        finally:
            del generator
        predicted = logits[start - 1:-1].astype(np.float32)
        chosen = predicted[np.arange(len(predicted)), ids[start:]]
        return ((predicted > chosen[:, None]).sum(1) + 1).tolist()


class CT2Float32Backend(CT2Backend):
    name = "ctranslate2-float32"
    quantization = "float32"
    compute_type = "float32"
