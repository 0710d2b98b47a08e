import optuna
import pytest

from trainer.search_space import SearchSpaceError, load_search_space, parse_search_space
from trainer.worker import DEFAULT_SEARCH_SPACE


def test_default_space_parses():
    space = load_search_space(DEFAULT_SEARCH_SPACE)
    names = [spec.name for spec in space.params]
    assert names == ["lr", "weight_decay", "channels", "dropout", "batch_size", "optimizer"]
    assert space.fixed["epochs"] == 10


def test_sample_stays_within_bounds():
    space = parse_search_space({
        "params": {
            "lr": {"type": "float", "low": "1e-4", "high": 0.1, "log": True},
            "units": {"type": "int", "low": 8, "high": 32, "step": 8},
            "act": {"type": "categorical", "choices": ["relu", "gelu", None]},
        },
        "fixed": {"epochs": 2},
    })
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        params = space.sample(study.ask())
        assert 1e-4 <= params["lr"] <= 0.1
        assert params["units"] in (8, 16, 24, 32)
        assert params["act"] in ("relu", "gelu", None)


@pytest.mark.parametrize(("document", "message"), [
    ([1, 2], "expected a mapping with a 'params' section"),
    ({"params": {}}, "'params' must be a non-empty mapping"),
    ({"params": {"x": {"type": "float", "low": 0, "high": 1}}, "extra": 1}, "unknown top-level key(s) extra"),
    ({"params": {"x": {"type": "float", "low": 0, "high": 1}}, "fixed": [1]}, "'fixed' must be a mapping"),
    ({"params": {"x": 3}}, "parameter 'x': expected a mapping"),
    ({"params": {"x": {"type": "normal"}}}, "parameter 'x': type must be float, int or categorical, got 'normal'"),
    ({"params": {"x": {"type": "float", "high": 1}}}, "parameter 'x': missing 'low'"),
    ({"params": {"x": {"type": "float", "low": "abc", "high": 1}}}, "parameter 'x': 'low' must be a number, got 'abc'"),
    ({"params": {"x": {"type": "float", "low": 2, "high": 1}}}, "parameter 'x': low (2.0) is greater than high (1.0)"),
    ({"params": {"x": {"type": "float", "low": 0, "high": 1, "log": True}}}, "parameter 'x': low (0.0) must be positive when log is true"),
    ({"params": {"x": {"type": "float", "low": 1, "high": 2, "log": True, "step": 0.5}}}, "parameter 'x': 'log' and 'step' cannot be used together"),
    ({"params": {"x": {"type": "float", "low": 1, "high": 2, "step": -1}}}, "parameter 'x': step (-1.0) must be positive"),
    ({"params": {"x": {"type": "float", "low": 1, "high": 2, "log": "yes"}}}, "parameter 'x': 'log' must be true or false"),
    ({"params": {"x": {"type": "int", "low": 1.5, "high": 4}}}, "parameter 'x': 'low' must be an integer for type int"),
    ({"params": {"x": {"type": "int", "low": 1, "high": 4, "choices": [1]}}}, "parameter 'x': unknown key(s) choices for type int"),
    ({"params": {"x": {"type": "categorical", "choices": []}}}, "parameter 'x': 'choices' must be a non-empty list"),
    ({"params": {"x": {"type": "categorical", "choices": [[1, 2]]}}}, "parameter 'x': choice [1, 2] is not null, bool, int, float or str"),
    ({"params": {"x": {"type": "categorical", "choices": [1, 1]}}}, "parameter 'x': 'choices' contains duplicates"),
    ({"params": {"x": {"type": "float", "low": 0, "high": 1}}, "fixed": {"x": 1}}, "x is both sampled in 'params' and set in 'fixed'"),
])
def test_invalid_space_names_problem(document, message):
    with pytest.raises(SearchSpaceError) as raised:
        parse_search_space(document, source="space.yml")
    assert str(raised.value).startswith("space.yml: ")
    assert message in str(raised.value)


def test_invalid_yaml_names_file(tmp_path):
    path = tmp_path / "broken.yml"
    path.write_text("params:\n  x: {type: float, low: 0\n")
    with pytest.raises(SearchSpaceError, match=f"search-space file {path} is not valid YAML"):
        load_search_space(path)


def test_missing_file_names_file(tmp_path):
    path = tmp_path / "absent.yml"
    with pytest.raises(SearchSpaceError, match=f"cannot read search-space file {path}"):
        load_search_space(path)
