import pytest
import yaml

from tasks.core.config import ParamsError, Params, apply_overrides, load_params, validate_params
from conftest import REPO, write_params


def raw_params():
    return yaml.safe_load((REPO / "params.yaml").read_text())


def error_for(mutate) -> str:
    raw = raw_params()
    mutate(raw)
    with pytest.raises(ParamsError) as err:
        validate_params(raw)
    return str(err.value)


def test_shipped_params_and_profiles_are_valid(tmp_path):
    assert isinstance(load_params(REPO / "params.yaml"), Params)
    profiles = sorted((REPO / "profiles").glob("*.yaml"))
    assert {p.stem for p in profiles} >= {"tiny", "gpu"}
    for profile in profiles:
        workspace = tmp_path / profile.stem
        data = yaml.safe_load(profile.read_text()).get("data", {})
        sources = [data.get("train", {}).get("source")] + [s["source"] for s in data.get("eval", [])]
        for source in sources:  # problem sets the user brings (profiles/gpu.yaml): stand-in files
            if source and source not in ("humaneval", "codeio"):
                (workspace / source).parent.mkdir(parents=True, exist_ok=True)
                (workspace / source).write_text("{}\n")
        write_params(workspace, profile)
        load_params(workspace / "params.yaml")


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
    assert params.sample.max_new_tokens == 48 and params.train.epochs == 3
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
])
def test_bad_params_name_the_key(mutate, key):
    assert key in error_for(mutate)


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
