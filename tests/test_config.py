import re
import subprocess
import sys

import pytest
import yaml

from tasks.core.config import EXIT_NO_RETRY, ParamsError, Params, load_params, run_stage, validate_params
from tasks.core.profiles import apply_overrides, sync_stage_lists
from conftest import REPO, write_params

PROFILES = sorted((REPO / "profiles").glob("*.yaml"))


def raw_params():
    return yaml.safe_load((REPO / "params.yaml").read_text())


def error_for(mutate) -> str:
    raw = raw_params()
    mutate(raw)
    with pytest.raises(ParamsError) as err:
        validate_params(raw)
    return str(err.value)


def rendered(profile, workspace) -> Params:
    """params.yaml with `profile` applied in `workspace`, stand-in files for the problem sets the
    user brings (profiles/gpu.yaml), validated as a stage validates it."""
    data = yaml.safe_load(profile.read_text()).get("data", {})
    sources = [data.get(key, {}).get("source") for key in ("train", "validation")]
    for source in sources + [s["source"] for s in data.get("eval", [])]:
        if source and source not in ("humaneval", "codeio"):
            (workspace / source).parent.mkdir(parents=True, exist_ok=True)
            (workspace / source).write_text("{}\n")
    write_params(workspace, profile)
    return load_params(workspace / "params.yaml")


def test_shipped_params_and_profiles_are_valid(tmp_path):
    assert isinstance(load_params(REPO / "params.yaml"), Params)
    assert {p.stem for p in PROFILES} >= {"tiny", "gpu"}
    for profile in PROFILES:
        rendered(profile, tmp_path / profile.stem)


# What a profile's comments say about its temperatures: "T_eval 1.1" (evaluate.temperature, the
# sweep's tie-breaker), "T_eval sweep 0.7, 0.9, 1.1" (evaluate.sweep), "T_train 1.6 (ssd)" (that
# sampling config's temperature; without a name, one of them).
STATED = re.compile(r"T_(train|eval) (sweep )?(\d+(?:\.\d+)?(?:, \d+(?:\.\d+)?)*)(?: \(([\w-]+)\))?")


def stated_temperatures(text: str) -> list[tuple[str, list[float], str | None]]:
    comments = " ".join(line.partition("#")[2].strip() for line in text.splitlines() if "#" in line)
    return [(f"T_{which}" + (" sweep" if sweep else ""), [float(v) for v in values.split(", ")], name or None)
            for which, sweep, values, name in STATED.findall(comments)]


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_each_profile_says_which_temperatures_are_in_force(profile, tmp_path):
    params = rendered(profile, tmp_path)
    stated = stated_temperatures(profile.read_text())
    assert {"T_eval", "T_eval sweep"} <= {kind for kind, _, _ in stated}, f"{profile.name}: state its T_eval and sweep"
    configs = {name: config.temperature for name, config in params.sample.configs.items()}
    for kind, values, name in stated:
        where = f"{profile.name} says {kind} {values}" + (f" ({name})" if name else "")
        if kind == "T_eval sweep":
            assert values == params.evaluate.sweep, f"{where}; evaluate.sweep is {params.evaluate.sweep}"
        elif kind == "T_eval":
            assert values == [params.evaluate.temperature], f"{where}; evaluate.temperature is {params.evaluate.temperature}"
        elif kind == "T_train" and name:
            assert values == [configs.get(name)], f"{where}; sample.configs: {configs}"
        elif kind == "T_train":
            assert len(values) == 1 and values[0] in configs.values(), f"{where}; sample.configs: {configs}"
        else:
            pytest.fail(f"{where}: no param holds a {kind}")


def test_stated_temperatures_are_read_from_comments_only():
    text = ("# T_train 1.6 (ssd), T_eval sweep 0.7, 0.9 around the paper's T_eval 1.1 (the tie-breaker)\n"
            "evaluate: {temperature: 0.5}   # T_train 0.8\nnote: T_eval 9.9\n")
    assert stated_temperatures(text) == [("T_train", [1.6], "ssd"), ("T_eval sweep", [0.7, 0.9], None),
                                         ("T_eval", [1.1], None), ("T_train", [0.8], None)]


def test_gpu_profile_is_the_papers_setting_validated_on_earlier_contests(tmp_path):
    """arXiv 2604.01193, Qwen3-4B-Instruct: T_train 1.6 / top-k 20 / top-p 0.8, T_eval 1.1; the
    sweep around it, chosen on LiveCodeBench problems that are not the test's."""
    params = rendered(REPO / "profiles/gpu.yaml", tmp_path)
    ssd, ev = params.sample.configs["ssd"], params.evaluate
    assert (ssd.temperature, ssd.top_k, ssd.top_p) == (1.6, 20, 0.8) and (ev.top_k, ev.top_p) == (20, 0.8)
    assert ev.temperature == 1.1 and min(ev.sweep) < 1.1 < max(ev.sweep)
    tested = {s.source for s in params.data.eval}
    assert "problems/livecodebench.jsonl" in tested
    validation = params.data.validation.source
    assert "livecodebench" in validation and validation not in tested | {params.data.train.source}


def test_the_science_profile_tests_all_of_humaneval(tmp_path):
    """profiles/science.yaml says it evaluates on all of HumanEval (its measured run did): no other
    set it draws takes HumanEval problems out of the test (params.yaml's validation would)."""
    params = rendered(REPO / "profiles/science.yaml", tmp_path)
    humaneval = next(s for s in params.data.eval if s.source == "humaneval")
    assert humaneval.max_problems == 0
    assert "humaneval" not in {params.data.train.source, params.data.validation.source}


def test_profiles_are_overlays_of_only_the_keys_they_change():
    """params.yaml is the one source of defaults: a profile that repeats a default is a copy
    that can drift."""
    defaults = raw_params()
    for profile in (REPO / "profiles").glob("*.yaml"):
        overlay = yaml.safe_load(profile.read_text())
        # Named sections (arms, sample.configs) are given whole by a profile: the whole must differ.
        assert overlay.get("arms", {}) != defaults["arms"], f"{profile.name}: arms repeats params.yaml"
        for section, values in overlay.items():
            if section == "arms":
                continue
            for key, value in values.items():
                assert key in defaults[section], f"{profile.name}: {section}.{key} is not a param"
                assert defaults[section][key] != value, f"{profile.name}: {section}.{key} repeats params.yaml"


def test_every_key_must_be_in_params_yaml():
    assert "sample.slots: missing" in error_for(lambda p: p["sample"].pop("slots"))
    with pytest.raises(ParamsError, match="model: missing"):
        validate_params({})


def test_profile_command_writes_the_overlay_keeping_comments(tmp_path, capsys):
    from tasks.commands import cli

    path = write_params(tmp_path)
    before = path.read_text()
    assert cli.main(["profile", str(REPO / "profiles/tiny.yaml"), "--params", str(path),
                     "--set", "train.epochs=3"]) == 0
    params = load_params(path)
    assert params.sample.max_new_tokens == 96 and params.train.epochs == 3
    assert params.sample.configs == load_params(REPO / "params.yaml").sample.configs
    assert "# T_eval, tuned separately from T_train" in path.read_text()
    # A profile that fails the schema writes nothing.
    bad = tmp_path / "bad.yaml"
    bad.write_text("sample:\n  top_p: 2\n")
    path.write_text(before)
    assert cli.main(["profile", str(bad), "--params", str(path)]) == 2
    assert "sample.top_p" in capsys.readouterr().err and path.read_text() == before


@pytest.mark.parametrize("mutate, key", [
    (lambda p: p["sample"].update(temprature=1.0), "sample.temprature: unknown key"),
    (lambda p: p.update(extra={}), "extra: unknown key"),
    (lambda p: p["sample"]["configs"]["ssd"].update(temperature=-0.1), "sample.configs.ssd.temperature"),
    (lambda p: p["sample"]["configs"]["ssd"].update(top_p=0.0), "sample.configs.ssd.top_p"),
    (lambda p: p["evaluate"].update(top_p=1.5), "evaluate.top_p"),
    (lambda p: p["train"].update(epochs="many"), "train.epochs"),
    (lambda p: p["evaluate"].update(k=[1, 5], n=2), "evaluate: evaluate.k contains 5"),
    (lambda p: p["arms"]["ssd-none"].update(filter="verifier"), "arms.ssd-none.filter: Input should be 'none'"),
    (lambda p: p["arms"]["ssd-none"].update(sample="hot"), "arms.ssd-none.sample: 'hot' is not a key of sample.configs"),
    (lambda p: p["arms"].update(base={"sample": "ssd", "filter": "none"}), "arm 'base': the name of the untrained model"),
    (lambda p: p["arms"].pop("null-none"), "sample.configs: null used by no arm"),
    (lambda p: p["sample"]["configs"].update({None: p["sample"]["configs"].pop("null")}),
     "sampling config None: lowercase letters, digits, '-' and '_' (it names files) (quote it"),
    (lambda p: p.update(arms={}), "arms: Dictionary should have at least 1 item"),
    (lambda p: p["train"].update(method="qlora"), "train.method"),
    (lambda p: p["evaluate"].update(temperature=1.1),
     "evaluate: evaluate.temperature 1.1 (the sweep's tie-breaker) is not in evaluate.sweep [0.5, 0.7, 0.9]"),
])
def test_bad_params_name_the_key(mutate, key):
    assert key in error_for(mutate)


def test_without_a_sweep_the_temperature_is_t_eval_itself():
    raw = raw_params()
    raw["evaluate"].update(temperature=1.1, sweep=[])
    assert validate_params(raw).evaluate.temperature == 1.1


def test_the_grid_checks_its_experiments_params_before_queueing_any(tmp_path, monkeypatch):
    from tasks.commands import grid

    write_params(tmp_path)
    monkeypatch.chdir(tmp_path)  # no DVC repo here: a queued experiment would fail, not raise ParamsError
    with pytest.raises(ParamsError, match=r"evaluate.temperature 0.7 \(the sweep's tie-breaker\) is not in "
                                          r"evaluate.sweep \[0.5, 0.9\]"):
        grid.queue("ssd", [0.6, 1.2], [0.5, 0.9], [])


def test_a_failure_a_rerun_would_repeat_exits_with_its_own_status(capsys):
    """The Prefect flow retries a failed stage unless it exits with EXIT_NO_RETRY (flows/pipeline.py)."""
    import torch

    from tasks.core.files import DataError

    def failing(err):
        def main():
            raise err
        return main

    assert EXIT_NO_RETRY not in (0, 1)  # 1: any other error (an uncaught exception, sys.exit("..."))
    assert run_stage(failing(ParamsError("params.yaml: train.lr: bad"))) == EXIT_NO_RETRY
    assert run_stage(failing(DataError("data/train.jsonl: empty"))) == EXIT_NO_RETRY
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
    assert run_stage(failing(oom)) == EXIT_NO_RETRY
    err = capsys.readouterr().err
    assert "error: params.yaml: train.lr: bad" in err and "error: data/train.jsonl: empty" in err
    assert "error: out of GPU memory at these params (a rerun would fail the same way" in err
    assert err.rstrip().endswith("Tried to allocate 2.00 GiB")  # the error line last: the flow leads with it
    with pytest.raises(RuntimeError, match="a bug"):  # anything else: its traceback, exit 1
        run_stage(failing(RuntimeError("a bug")))


@pytest.mark.parametrize("section, key, value", [
    ("train", "bf16", "yes"), ("train", "micro_batch_size", "2"), ("train", "warmup_steps", 2.0),
    ("train", "packing", 1), ("sample", "n", True), ("evaluate", "k", ["1"]),
])
def test_ints_and_bools_are_not_converted(section, key, value):
    # A quoted "yes" or "2" in YAML is a string: a mistake to name, not a value to guess.
    assert f"{section}.{key}" in error_for(lambda p: p[section].update({key: value}))


def test_floats_still_take_ints_and_exponents(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-4 without a dot as a string, as `dvc exp run -S train.lr=1e-4` may write it.
    path = write_params(tmp_path)
    path.write_text(path.read_text().replace("lr: 5.0e-5", "lr: 1e-4").replace("epochs: 1", "epochs: 2"))
    params = load_params(path)
    assert params.train.lr == 1e-4 and params.train.epochs == 2.0


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("sample: [unclosed\n")
    with pytest.raises(ParamsError, match=str(path)):
        load_params(path)


def test_overrides_are_parsed_as_yaml():
    raw = apply_overrides(raw_params(), ["sample.configs.ssd.temperature=1.6", "arms.ssd-none.filter=syntax",
                                         "train.lr=1e-4"])
    assert raw["train"]["lr"] == 1e-4 and isinstance(raw["train"]["lr"], float)  # YAML 1.2, as DVC reads it
    params = validate_params(raw)
    assert params.sample.configs["ssd"].temperature == 1.6 and params.sample.configs["ssd"].top_k == 20
    assert params.arms["ssd-none"].filter == "syntax" and list(params.arms) == list(raw_params()["arms"])  # one leaf set
    # A mapping given for a key is that key's whole value: the arms are exactly these.
    raw = apply_overrides(raw_params(), ['arms={"a": {"sample": "ssd", "filter": "none"}}', "sample.configs.null=null"])
    raw["sample"]["configs"].pop("null")
    sync_stage_lists(raw)  # sample.stages follows the configs, as update_params_file keeps it
    assert list(validate_params(raw).arms) == ["a"]
    with pytest.raises(ParamsError, match="key=value"):
        apply_overrides(raw_params(), ["sample.temperature"])


@pytest.mark.parametrize("mutate, key", [
    (lambda p: p["evaluate"].update(k=[]), "evaluate.k: List should have at least 1 item"),
    (lambda p: p["data"]["train"].update(source="problems/nope.jsonl"),
     "data.train.source: problems/nope.jsonl: no such file"),
    (lambda p: p["data"]["eval"].append({"name": "Bad Name", "source": "humaneval", "max_problems": 0}),
     "data.eval.2.name: eval set 'Bad Name': lowercase letters"),
    (lambda p: p["data"]["eval"].append(dict(p["data"]["eval"][0])), "data.eval: eval set names must be unique"),
])
def test_values_that_would_fail_later_fail_now(mutate, key):
    assert key in error_for(mutate)


def test_a_profile_applies_before_its_problem_files_exist_and_the_stages_refuse_until_then(tmp_path, capsys):
    """`selfdistill profile gpu` comes before the imports that make its problem files: it applies,
    naming each missing file and the command (from the profile's comments) that makes it."""
    from tasks.commands import cli

    path = write_params(tmp_path)
    assert cli.main(["profile", str(REPO / "profiles/gpu.yaml"), "--params", str(path)]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(path.read_text())["evaluate"]["sweep"] == [0.7, 0.9, 1.1, 1.3]
    missing = {"data.train.source": "rstar-coder SRC -o problems/rstar_seed.jsonl",
               "data.validation.source": "livecodebench SRC -o problems/livecodebench_validation.jsonl "
                                         "--since 2024-10-01 --until 2025-01-31",
               "data.eval.0.source": "livecodebench SRC -o problems/livecodebench.jsonl "
                                     "--since 2025-02-01 --until 2025-05-31"}
    for key, command in missing.items():
        file = command.split(" -o ")[1].split()[0]
        assert f"  {key}: {file}; make it with:\n    selfdistill problems import --format {command}\n" in out, out

    # Every stage validates the params first: it refuses, naming the key, with the status the
    # Prefect flow does not retry.
    with pytest.raises(ParamsError, match=r"data\.eval\.0\.source: problems/livecodebench.jsonl: no such file"):
        load_params(path)
    assert cli.main(["validate", str(path)]) == 2
    assert "data.validation.source: problems/livecodebench_validation.jsonl: no such file" in capsys.readouterr().err
    stage = subprocess.run([sys.executable, "-m", "tasks.prepare"], cwd=tmp_path, capture_output=True, text=True,
                           env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert stage.returncode == EXIT_NO_RETRY, stage.stderr[-2000:]
    assert "data.train.source: problems/rstar_seed.jsonl: no such file" in stage.stderr

    for command in missing.values():
        file = tmp_path / command.split(" -o ")[1].split()[0]
        file.parent.mkdir(exist_ok=True)
        file.write_text("{}\n")
    assert load_params(path).data.validation.source == "problems/livecodebench_validation.jsonl"
    assert cli.main(["profile", str(REPO / "profiles/gpu.yaml"), "--params", str(path)]) == 0
    assert "Not there yet" not in capsys.readouterr().out


def test_a_relative_problem_file_is_found_in_the_params_files_workspace(tmp_path, monkeypatch):
    (tmp_path / "problems").mkdir()
    (tmp_path / "problems/mine.jsonl").write_text("{}\n")
    write_params(tmp_path, overrides={"data": {"train": {"source": "problems/mine.jsonl", "max_problems": 0}}})
    monkeypatch.chdir(REPO)  # elsewhere, as `selfdistill flow run --repo DIR` is
    assert load_params(tmp_path / "params.yaml").data.train.source == "problems/mine.jsonl"


def test_validate_command_errors_are_one_line_naming_the_file(tmp_path, capsys):
    from tasks.commands import cli

    bad = tmp_path / "params.yaml"
    bad.write_text("sample: [unclosed\n")
    assert cli.main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f'in "{bad}", line' in err and "<unicode string>" not in err and "Traceback" not in err
    bad.write_text("")
    assert cli.main(["validate", str(bad)]) == 2
    assert "model: missing" in capsys.readouterr().err
    assert cli.main(["validate", str(REPO / "params.yaml")]) == 0


def test_a_profile_gives_its_arms_whole(tmp_path):
    """A profile's arms are its arms (not params.yaml's plus its own): profiles/tiny.yaml has two."""
    params = load_params(write_params(tmp_path, REPO / "profiles/tiny.yaml"))
    assert list(params.arms) == ["ssd-none", "null-shortest"]
    assert list(params.sample.configs) == ["ssd", "null"]


def test_a_problem_file_outside_problems_or_empty_is_refused(tmp_path):
    """prepare's DVC deps hold problems/: a source elsewhere could change unseen; an empty one
    would fail later, after the model stage ran."""
    raw = raw_params()
    (tmp_path / "problems").mkdir()
    (tmp_path / "mine.jsonl").write_text('{"task_id": "x"}\n')
    raw["data"]["train"]["source"] = "mine.jsonl"
    with pytest.raises(ParamsError, match=r"data\.train\.source: mine\.jsonl: outside problems/"):
        validate_params(raw, "params.yaml", tmp_path)
    raw["data"]["train"]["source"] = "problems/../mine.jsonl"
    with pytest.raises(ParamsError, match="outside problems/"):
        validate_params(raw, "params.yaml", tmp_path)
    (tmp_path / "problems/empty.jsonl").write_text("\n")
    raw["data"]["train"]["source"] = "problems/empty.jsonl"
    with pytest.raises(ParamsError, match=r"data\.train\.source: problems/empty\.jsonl: an empty file"):
        validate_params(raw, "params.yaml", tmp_path)
