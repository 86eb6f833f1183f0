import pytest

from tnet.config import TNetConfig
from tnet.configtools import apply_overrides, flatten, from_dict, load_config, to_dict
from training.config import JobConfig, load_job_config


def test_overrides_nested_and_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  num_classes: 5\n  locations: [2]\ntrain:\n  lr: 0.001\n")
    cfg = load_config(JobConfig, path, ["train.lr=1e-4", "model.locations=[3]", "train.epochs=2"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.model.locations == (3,)
    assert cfg.train.epochs == 2


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match="model.num_clases: unknown key"):
        from_dict(JobConfig, {"model": {"num_clases": 3}})


def test_validation_names_field():
    with pytest.raises(ValueError, match="locations=\\[2, 2\\]"):
        TNetConfig(levels=2, locations=(2, 2))


def test_round_trip_through_plain_data():
    cfg = load_job_config("configs/fmow_896.yaml")
    assert from_dict(JobConfig, to_dict(cfg)) == cfg
    flat = flatten(to_dict(cfg))
    assert flat["model.input_size"] == 896 and flat["model.locations"] == [2, 1]


def test_bad_override_text():
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides({}, ["nonsense"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="nope.yaml: config file not found"):
        load_job_config(tmp_path / "nope.yaml")
