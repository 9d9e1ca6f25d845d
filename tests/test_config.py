import pytest
import yaml

from tasks.config import ParamsError, Params, apply_overrides, load_params, validate_params
from conftest import REPO


def raw_params():
    return yaml.safe_load((REPO / "params.yaml").read_text())


def error_for(mutate) -> str:
    raw = raw_params()
    mutate(raw)
    with pytest.raises(ParamsError) as err:
        validate_params(raw)
    return str(err.value)


def test_shipped_params_and_profiles_are_valid():
    assert isinstance(load_params(REPO / "params.yaml"), Params)
    for profile in (REPO / "profiles").glob("*.yaml"):
        load_params(profile)


@pytest.mark.parametrize("mutate, key", [
    (lambda p: p["sample"].update(temprature=1.0), "sample.temprature: unknown key"),
    (lambda p: p.update(extra={}), "extra: unknown key"),
    (lambda p: p["sample"].update(temperature=-0.1), "sample.temperature"),
    (lambda p: p["sample"].update(top_p=0.0), "sample.top_p"),
    (lambda p: p["evaluate"].update(top_p=1.5), "evaluate.top_p"),
    (lambda p: p["train"].update(epochs="many"), "train.epochs"),
    (lambda p: p["evaluate"].update(k=[1, 5], n=2), "evaluate: evaluate.k contains 5"),
    (lambda p: p["filter"].update(arms=["none", "verifier"]), "filter.arms: unknown filter arm 'verifier'"),
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
    raw = apply_overrides(raw_params(), ["sample.temperature=1.6", "filter.arms=[none, syntax]", "train.lr=1e-4"])
    assert raw["train"]["lr"] == 1e-4 and isinstance(raw["train"]["lr"], float)  # YAML 1.2, as DVC reads it
    params = validate_params(raw)
    assert params.sample.temperature == 1.6 and params.filter.arms == ["none", "syntax"]
    with pytest.raises(ParamsError, match="key=value"):
        apply_overrides(raw_params(), ["sample.temperature"])
