"""`selfdistill convert`: an HF model dir -> a CTranslate2 model dir for the `ctranslate2*` backends.

    selfdistill convert --model models/base [--quantization int8] [--out models/base.ct2-int8]

Not a pipeline stage: the default backends sample from the HF dir directly, so a user who picks a
`ctranslate2*` backend converts each model once by hand (the backend says so, with the command).

The converted dir sits beside the model (`<model>.ct2-<quantization>` unless --out says so)
and is self-contained: CTranslate2's model.bin and vocabulary, plus (in hf/) the tokenizer,
chat template and generation config copied from the HF dir. `convert.json` in it records the
sha256 of the HF dir it came from; the `ctranslate2*` backends refuse a converted dir whose
recorded fingerprint does not match the model they were asked to sample from, so a retrained
arm can never be sampled through a stale conversion.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from tasks.core.files import DataError, atomic_path, dir_sha256

SUFFIX = ".ct2-"
MARKER = "convert.json"
QUANTIZATIONS = ("int8", "float32")
# Files of an HF dir that the sampler needs besides the weights.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "generation_config.json", "config.json", "vocab.json", "merges.txt", "tokenizer.model")


def converted_dir(model_dir: str | Path, quantization: str = "int8") -> Path:
    """Where a conversion of `model_dir` lives by default: `models/base` -> `models/base.ct2-int8`."""
    model_dir = Path(model_dir)
    return model_dir.with_name(model_dir.name + SUFFIX + quantization)


def is_converted(path: str | Path) -> bool:
    path = Path(path)
    return (path / "model.bin").is_file() and (path / MARKER).is_file()


def read_marker(path: str | Path) -> dict:
    return json.loads((Path(path) / MARKER).read_text())


def resolve(model_dir: str | Path, quantization: str = "int8") -> Path:
    """The CTranslate2 dir to sample `model_dir` with, at the given weight quantization: the dir
    itself if it is such a conversion, else `<model_dir>.ct2-<quantization>`, checked against
    the model's current fingerprint (a stale conversion is an error, never silently used)."""
    model_dir = Path(model_dir)
    if is_converted(model_dir):
        target = model_dir
    else:
        target = converted_dir(model_dir, quantization)
        command = f"selfdistill convert --model {model_dir} --quantization {quantization}"
        if not is_converted(target):
            raise DataError(f"{model_dir}: no CTranslate2 conversion at {target}; run `{command}`")
        if read_marker(target).get("source_sha256") != dir_sha256(model_dir):
            raise DataError(f"{target} was converted from a different version of {model_dir}; "
                            f"run `{command}` again")
    found = read_marker(target).get("quantization")
    if found != quantization:
        raise DataError(f"{target} holds {found} weights, but this backend samples from {quantization} "
                        f"weights; convert with --quantization {quantization}")
    return target


def convert(model_dir: str | Path, out_dir: str | Path | None = None, quantization: str = "int8") -> Path:
    from importlib.metadata import version

    from ctranslate2.converters import TransformersConverter

    model_dir = Path(model_dir)
    out_dir = Path(out_dir) if out_dir else converted_dir(model_dir, quantization)
    if quantization not in QUANTIZATIONS:
        raise DataError(f"--quantization {quantization!r}: expected one of {', '.join(QUANTIZATIONS)}")
    if not (model_dir / "config.json").is_file():
        raise DataError(f"{model_dir}: not an HF model dir (no config.json)")
    fingerprint = dir_sha256(model_dir)
    with atomic_path(out_dir, is_dir=True) as tmp:
        TransformersConverter(str(model_dir), low_cpu_mem_usage=True).convert(
            str(tmp), quantization=quantization, force=True)
        # CTranslate2 refuses to load a config whose bos/unk token is null (models without a
        # BOS, like Qwen's, or tokenizers without an unk); the backend never uses either.
        ct2_config = json.loads((tmp / "config.json").read_text())
        for key in ("bos_token", "unk_token", "eos_token"):
            if not ct2_config.get(key):
                ct2_config[key] = ct2_config.get("eos_token") or "</s>"
        (tmp / "config.json").write_text(json.dumps(ct2_config, indent=2) + "\n")
        # The tokenizer, chat template and generation config (EOS ids) go into hf/, apart from
        # CTranslate2's own config.json.
        (tmp / "hf").mkdir()
        for name in SIDE_FILES:
            if (model_dir / name).is_file():
                shutil.copy(model_dir / name, tmp / "hf" / name)
        (tmp / MARKER).write_text(json.dumps({
            "source": str(model_dir), "source_sha256": fingerprint, "quantization": quantization,
            "ctranslate2": version("ctranslate2"),
        }, indent=2) + "\n")
    print(f"convert: {model_dir} -> {out_dir} (ctranslate2, {quantization})")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="selfdistill convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF model dir, e.g. models/base")
    parser.add_argument("--quantization", default="int8", choices=QUANTIZATIONS,
                        help="int8 for backend ctranslate2, float32 for backend ctranslate2-float32")
    parser.add_argument("--out", help="output dir (default: <model>.ct2-<quantization>)")
    args = parser.parse_args(argv)
    convert(args.model, args.out, args.quantization)
    return 0

