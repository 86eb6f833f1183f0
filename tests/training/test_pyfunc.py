"""TNet as an MLflow pyfunc model: logged as code + weights + config, loaded back, no pickles."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
import yaml

from tests.fixtures.tiny_mnist import tiny_model
from tnet.model import TNet
from tnet.regions import TensorRegionSource
from training.pyfunc import images_to_tensor, log_pyfunc


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One tiny TNet logged and registered in a SQLite MLflow under tmp, with its local copy."""
    tmp = tmp_path_factory.mktemp("pyfunc")
    previous = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    torch.manual_seed(0)
    model = TNet(tiny_model()).eval()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 512, 512), dtype=np.uint8)
    try:
        experiment = mlflow.create_experiment("pyfunc", artifact_location=(tmp / "mlruns").as_uri())
        with mlflow.start_run(experiment_id=experiment) as run:
            info = log_pyfunc(model, tmp / "staging", registered_name="tnet-pyfunc", example=images)
        local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp / "download")))
        yield {"model": model, "images": images, "info": info, "run_id": run.info.run_id, "local": local,
               "uri": uri}
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def loaded(logged: dict[str, Any]) -> Any:
    return mlflow.pyfunc.load_model(f"models:/tnet-pyfunc/{logged['info'].registered_model_version}")


def test_predict_returns_one_row_per_image_with_probabilities_and_boxes(logged: dict[str, Any], loaded: Any) -> None:
    images = logged["images"]
    out = loaded.predict(images)
    assert list(out.columns) == ["prediction", "probabilities", "boxes", "scores"]
    assert len(out) == 2
    with torch.no_grad():
        expected = logged["model"](TensorRegionSource(images_to_tensor(images, 1))).logits.softmax(-1).numpy()
    for i, row in out.iterrows():
        probs = np.asarray(row["probabilities"])
        assert probs.shape == (10,)
        np.testing.assert_allclose(probs, expected[i], atol=1e-5)  # the same weights, the same code
        assert row["prediction"] == int(expected[i].argmax())
        boxes = np.asarray(row["boxes"])
        assert boxes.shape == (2, 4)  # locations=(2,): two attended boxes, input-image pixels xyxy
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert boxes.min() >= -1 and boxes.max() <= 513
        assert len(row["scores"]) == 2 and all(0.0 < s <= 1.0 for s in row["scores"])


def test_any_image_size_is_accepted(logged: dict[str, Any], loaded: Any) -> None:
    """The signature fixes the dtype, not the size (TNet squash-resizes whatever it gets)."""
    images = logged["images"][:1, :300, :400].copy()
    out = loaded.predict(images)
    assert np.asarray(out["boxes"][0]).max() <= 401  # boxes in this image's own pixels
    assert loaded.metadata.get_input_schema().inputs[0].shape == (-1, -1, -1)


def test_locations_param_changes_the_number_of_boxes(logged: dict[str, Any], loaded: Any) -> None:
    images = logged["images"]
    for k in (1, 3, 5):
        out = loaded.predict(images, params={"locations": [k]})
        assert [len(b) for b in out["boxes"]] == [k, k]
        assert [len(s) for s in out["scores"]] == [k, k]


def test_registered_model_loads_by_alias(logged: dict[str, Any]) -> None:
    client = mlflow.tracking.MlflowClient(logged["uri"])
    client.set_registered_model_alias("tnet-pyfunc", "candidate", str(logged["info"].registered_model_version))
    model = mlflow.pyfunc.load_model("models:/tnet-pyfunc@candidate")
    assert len(model.predict(logged["images"][:1])) == 1


def test_logged_model_is_code_weights_and_config_without_pickles(logged: dict[str, Any]) -> None:
    local: Path = logged["local"]
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    flavor = mlmodel["flavors"]["python_function"]
    # models-from-code: the loader runs the entry file (shipped with the code), no python_model.pkl
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert Path(flavor["model_code_path"]).name == "pyfunc_entry.py"
    assert "python_model" not in flavor
    names = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert not [n for n in names if n.endswith((".pkl", ".pickle", ".cloudpickle"))], names
    assert {"code/tnet/model.py", "code/training/pyfunc.py", "code/training/pyfunc_entry.py"} <= set(names)
    weights = next(local.rglob("weights.pt"))
    state = torch.load(weights, map_location="cpu", weights_only=True)  # plain tensors only
    assert set(state) == set(logged["model"].state_dict())
    config = yaml.safe_load(next(local.rglob("model.yaml")).read_text())
    assert config["backbone"] == "tiny_s" and config["input_size"] == 512
    requirements = (local / "requirements.txt").read_text()
    assert "torch==" in requirements and "mlflow==" in requirements


def test_loading_reads_the_weights_with_weights_only(logged: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    real_load = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    mlflow.pyfunc.load_model(str(logged["local"]))
    assert calls and all(c.get("weights_only") is True for c in calls)


def test_the_registered_model_reads_its_eval_locations(logged: dict[str, Any], tmp_path: Path) -> None:
    """A model trained with k = 2 and configured to read 3 cells outside training does so when
    served (without params), and its signature advertises that default."""
    torch.manual_seed(0)
    model = TNet(tiny_model(eval_locations=(3,))).eval()
    images = logged["images"]
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("pyfunc").experiment_id):
        info = log_pyfunc(model, tmp_path / "staging", example=images)
    served = mlflow.pyfunc.load_model(info.model_uri)
    assert [len(b) for b in served.predict(images)["boxes"]] == [3, 3]
    assert [len(b) for b in served.predict(images, params={"locations": [2]})["boxes"]] == [2, 2]
    params = {p.name: p.default for p in served.metadata.get_params_schema().params}
    assert list(params["locations"]) == [3]
