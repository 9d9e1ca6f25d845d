"""`selfdistill plan`: what each stage will cost, from the params and the model's shape alone."""
import json

import pytest

from conftest import REPO
from tasks.commands import cli
from tasks.commands.plan import load_for_plan
from tasks.core import plan as planning
from tasks.core import shapes
from tasks.core.config import ParamsError
from tasks.core.plan import GiB, Machine, plan, refusals

# An H100 80GB's memory as nvidia-smi reports it (81,559 MiB): "one 80 GB GPU".
H100_80GB = 81_559 * 2 ** 20
GPU_MACHINE = Machine(gpu=H100_80GB, ram=128 * GiB, cores=16)
CPU_MACHINE = Machine(gpu=None, ram=16 * GiB, cores=2)
# docs/results/training.md: peak RSS of the default train@ssd-none on 2 CPU cores (the stage process's
# ru_maxrss, `/usr/bin/time -v .venv/bin/python -m tasks.train --arm ssd-none` after `make demo`).
MEASURED_DEFAULT_TRAIN_PEAK_RSS = 3.55 * GiB
QWEN3_4B = "Qwen/Qwen3-4B-Instruct-2507"


def stage_plan(plans, name: str):
    return next(s for s in plans if name in s.stages)


def plan_of(params, machine, **kwargs):
    return plan(params, shapes.model_shape(params.model.base, params.model.revision, REPO), machine, **kwargs)


def test_the_gpu_profile_fits_one_80gb_gpu():
    params = load_for_plan(REPO / "params.yaml", profile=str(REPO / "profiles/gpu.yaml"))
    plans = plan_of(params, GPU_MACHINE)
    assert refusals(plans, GPU_MACHINE) == []
    train = stage_plan(plans, "train@ssd-none")
    assert train.device == "gpu" and train.peak()[0] <= H100_80GB


def test_a_4b_model_on_transformers_at_256_x_4096_is_refused_naming_the_key(tmp_path, capsys):
    settings = [f"model.base={QWEN3_4B}", "sample.backend=transformers", "sample.batch_size=256",
                "sample.max_new_tokens=4096", "sample.max_batch_tokens=0"]
    # The KV cache alone, at 256 sequences of (the plan's longest prompt + 4,096) tokens, is more
    # than the GPU has, whatever happens to the prefill's logits.
    shape = shapes.from_table(QWEN3_4B)
    assert 256 * (1024 + 4096) * shape.kv_bytes_per_token(2) > 2 * H100_80GB
    args = ["plan", "--params", str(REPO / "params.yaml"), "--gpu-memory", str(H100_80GB / GiB), "--ram", "128"]
    assert cli.main(args + [f"--set={s}" for s in settings]) == 1
    err = capsys.readouterr().err
    assert "sample@ssd" in err and "set sample.max_batch_tokens:" in err and "sample.batch_size" in err
    # The value it names fits.
    suggested = err.split("set sample.max_batch_tokens: ")[1].split()[0]
    params = load_for_plan(REPO / "params.yaml", overrides=settings[:-1] + [f"sample.max_batch_tokens={suggested}"])
    assert stage_plan(plan_of(params, GPU_MACHINE), "sample@ssd").fits(GPU_MACHINE)


def test_the_cpu_training_estimate_of_the_default_is_within_25_percent_of_the_measured_peak_rss():
    params = load_for_plan(REPO / "params.yaml")
    train = stage_plan(plan_of(params, CPU_MACHINE), "train@ssd-none")
    estimate, _ = train.peak()
    assert train.device == "cpu"
    assert abs(estimate - MEASURED_DEFAULT_TRAIN_PEAK_RSS) <= 0.25 * MEASURED_DEFAULT_TRAIN_PEAK_RSS, estimate / GiB


def test_the_shipped_table_is_used_when_no_config_json_is_found(tmp_path, monkeypatch):
    monkeypatch.setattr(shapes, "cached_config", lambda repo_id, revision: None)  # nothing in the hub cache
    shape = shapes.model_shape(QWEN3_4B, workspace=tmp_path)
    assert "model_shapes.json" in shape.source
    assert (shape.layers, shape.kv_heads, shape.head_dim, shape.vocab) == (36, 8, 128, 151936)
    # A config.json found first wins over the table: in the hub cache, or in a local dir.
    cached = tmp_path / "config.json"
    cached.write_text(json.dumps({**shapes.table()[QWEN3_4B]["config"], "num_hidden_layers": 2}))
    monkeypatch.setattr(shapes, "cached_config", lambda repo_id, revision: cached)
    assert shapes.model_shape(QWEN3_4B, workspace=tmp_path).layers == 2
    local = tmp_path / "mymodel"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({**shapes.table()[QWEN3_4B]["config"], "num_hidden_layers": 3}))
    assert shapes.model_shape("mymodel", workspace=tmp_path).layers == 3
    # Neither: an error naming the param and how to fetch only the config.
    monkeypatch.setattr(shapes, "cached_config", lambda repo_id, revision: None)
    with pytest.raises(ParamsError, match=r"model.base='someone/unknown'.*config.json"):
        shapes.model_shape("someone/unknown", workspace=tmp_path)


def test_parameter_counts_of_the_table_are_the_model_cards_and_transformers_models():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cards = {  # total (and active) parameters from the model cards
        "HuggingFaceTB/SmolLM2-135M-Instruct": (134.5e6, None), QWEN3_4B: (4.02e9, None),
        "Qwen/Qwen3-4B-Thinking-2507": (4.02e9, None), "Qwen/Qwen3-30B-A3B-Instruct-2507": (30.5e9, 3.3e9),
        "meta-llama/Llama-3.1-8B-Instruct": (8.03e9, None)}
    assert set(cards) == set(shapes.table())
    for name, entry in shapes.table().items():
        shape = shapes.from_table(name)
        total, active = cards[name]
        assert shape.parameters() == pytest.approx(total, rel=0.01), name
        if active:
            assert shape.parameters(active=True) == pytest.approx(active, rel=0.03), name
        config = {k: v for k, v in entry["config"].items() if k != "model_type"}
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(entry["config"]["model_type"], **config))
        assert shape.parameters() == sum(p.numel() for p in model.parameters()), name


def test_the_embedded_default_in_the_table_is_its_gguf():
    pytest.importorskip("gguf")
    from transformers import AutoConfig

    from tasks.core.modeling import embedded_gguf_path

    gguf = embedded_gguf_path()
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name).to_dict()
    table = shapes.table()[shapes.EMBEDDED_HUB_ID]["config"]
    assert {k: config[k] for k in table if k != "torch_dtype"} == {k: v for k, v in table.items() if k != "torch_dtype"}


def test_problem_counts_bound_prepares(tmp_path, monkeypatch):
    """The plan's counts of train, validation and eval problems are what `prepare` writes, at most
    (prepare also drops near-duplicates and train prompts that share text with a test problem)."""
    from tasks.prepare import prepare_data

    params = load_for_plan(REPO / "params.yaml", overrides=[
        "data.train.source=humaneval", "data.train.max_problems=0", "data.validation.source=humaneval",
        "data.validation.max_problems=20", 'data.eval=[{"name": "humaneval", "source": "humaneval", "max_problems": 0}]'])
    monkeypatch.chdir(tmp_path)
    prepare_data(params)
    written = json.loads((tmp_path / "data/source.json").read_text())
    counts = planning.problem_counts(params, tmp_path)
    for planned, actual in [(counts["train"], written["train"]["problems"]),
                            (counts["validation"], written["validation"]["problems"]),
                            (counts["eval"]["humaneval"], written["eval"]["humaneval"]["problems"])]:
        assert actual <= planned <= 1.05 * actual


def test_sharding_divides_what_the_accelerate_config_shards(tmp_path):
    params = load_for_plan(REPO / "params.yaml", overrides=[f"model.base={QWEN3_4B}"])
    shape = shapes.from_table(QWEN3_4B)

    def parts(config: str) -> dict:
        (tmp_path / "accel.yaml").write_text(config)
        processes, sharded, _ = planning.accelerate_layout("accel.yaml", tmp_path)
        memory = planning.training_memory(params.train, shape, 1, 512, "gpu", processes, sharded)
        return {p.label.split(",")[0]: p.bytes for p in memory}

    ddp = parts("distributed_type: MULTI_GPU\nnum_processes: 8\n")
    fsdp = parts("distributed_type: FSDP\nnum_processes: 8\nfsdp_config:\n  fsdp_sharding_strategy: FULL_SHARD\n")
    zero2 = parts("distributed_type: DEEPSPEED\nnum_processes: 8\ndeepspeed_config:\n  zero_stage: 2\n")
    P = shape.parameters()
    assert ddp["weights"] == 4 * P and ddp["AdamW's two moments"] == 8 * P
    assert fsdp["weights"] == 4 * P / 8 and fsdp["gradients"] == 4 * P / 8 and fsdp["AdamW's two moments"] == P
    assert zero2["weights"] == 4 * P and zero2["gradients"] == 4 * P / 8


def test_dvc_cache_type_decides_the_copies(tmp_path):
    assert planning.cache_copies(planning.dvc_cache_type(tmp_path)) == 1  # DVC's default: reflink, else copy
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc/config").write_text("[core]\n    autostage = true\n[cache]\n    type = hardlink,symlink\n")
    assert planning.dvc_cache_type(tmp_path) == "hardlink,symlink"
    assert planning.cache_copies("hardlink,symlink") == 0
    assert planning.cache_copies(planning.dvc_cache_type(REPO)) == 0  # the repo's own: links before copy


def test_constants_mirrored_from_the_stages_agree(tmp_path):
    from tasks.core.config import load_params
    from tasks.training import sft

    assert planning.LOSS_CHUNK == sft.LOSS_CHUNK
    args = sft.training_args(load_params(REPO / "params.yaml").train, tmp_path)
    assert planning.CHECKPOINTS_KEPT == args.save_total_limit


def test_validate_warns_of_a_stage_that_will_not_fit_and_still_passes(tmp_path, monkeypatch, capsys):
    from tasks.commands import plan as plan_command
    from conftest import write_params

    monkeypatch.setattr(plan_command, "detect_machine", lambda *args: GPU_MACHINE)
    path = write_params(tmp_path, overrides={"model": {"base": QWEN3_4B}, "sample": {
        "backend": "transformers", "batch_size": 256, "max_new_tokens": 4096}})
    assert cli.main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "params OK" in out and "warning: sample@ssd" in out and "sample.max_batch_tokens" in out
    # A model whose shape is nowhere to be found: a warning, validate still passes.
    monkeypatch.setattr(shapes, "cached_config", lambda repo_id, revision: None)
    path = write_params(tmp_path, overrides={"model": {"base": "someone/unknown"}})
    assert cli.main(["validate", str(path)]) == 0
    assert "warning: no resource plan" in capsys.readouterr().out
