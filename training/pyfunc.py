"""TNet as an MLflow pyfunc model: our code plus a state_dict and a config, no pickled modules.

``torch.export`` cannot trace TNet's data-dependent crops, and a pickled module breaks whenever the
code moves. So the logged model is this small wrapper, the project's ``tnet`` package as code, the
weights (loaded with ``weights_only=True``) and the model config as YAML.

``predict`` takes a batch of images (a numpy array (B, H, W) or (B, H, W, C), uint8 or float in
[0, 1]) and returns one row per image: the predicted class, the class probabilities, the attended
boxes in the input image's pixel coordinates and their scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
import yaml

from tnet.config import TNetConfig
from tnet.configtools import from_dict, to_dict
from tnet.model import TNet

ROOT = Path(__file__).resolve().parents[1]
CODE_PATHS = [str(ROOT / "tnet"), str(ROOT / "training")]  # shipped with the model
ENTRY = Path(__file__).resolve().parent / "pyfunc_entry.py"
# What the shipped code imports. Given explicitly: MLflow's default inference re-imports the model
# in a subprocess, which took 32 s of a 36 s log_model on a 2-core machine.
REQUIREMENTS = ("mlflow", "numpy", "pandas", "pyyaml", "timm", "torch")


def pip_requirements() -> list[str]:
    """``REQUIREMENTS`` pinned to the versions installed here (the ones the model was trained with)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in REQUIREMENTS]


def images_to_tensor(images: np.ndarray, in_chans: int) -> torch.Tensor:
    """(B, H, W[, C]) uint8 or [0, 1] floats -> (B, C, H, W) float in [-1, 1]."""
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4:
        raise ValueError(f"images.shape={arr.shape}: expected (B, H, W) or (B, H, W, C)")
    t = torch.from_numpy(arr.astype(np.float32))
    if arr.dtype == np.uint8:
        t = t / 255.0
    t = t.permute(0, 3, 1, 2)
    if t.shape[1] != in_chans:
        t = t.mean(1, keepdim=True) if in_chans == 1 else t[:, :1].expand(-1, 3, -1, -1)
    return t * 2 - 1


class TNetPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        cfg_data = yaml.safe_load(Path(context.artifacts["config"]).read_text())
        self.cfg = from_dict(TNetConfig, cfg_data, "model")
        self.class_names = cfg_data.get("class_names") if isinstance(cfg_data, dict) else None
        self.model = TNet(self.cfg).eval()
        state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        self.model.load_state_dict(state)

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        images = model_input if isinstance(model_input, np.ndarray) else np.stack(list(model_input))
        locations = (params or {}).get("locations")
        with torch.no_grad():
            # a tensor: TNet reads it as its config says (antialias, read_upsample), as in training
            out = self.model(images_to_tensor(images, self.cfg.in_chans), locations)
        probs = out.logits.softmax(-1).numpy()
        rows = []
        for i in range(len(probs)):
            boxes = [b for s in out.selections for b in s.source_boxes[i].tolist()]
            scores = [p for s in out.selections for p in s.log_probs[i].exp().tolist()]
            rows.append({"prediction": int(probs[i].argmax()), "probabilities": probs[i].tolist(),
                         "boxes": boxes, "scores": scores})
        return pd.DataFrame(rows)


def save_artifacts(model: TNet, folder: Path) -> dict[str, str]:
    """Write the weights and the model config; return the artifacts mapping for ``log_model``."""
    folder.mkdir(parents=True, exist_ok=True)
    weights, config = folder / "weights.pt", folder / "model.yaml"
    torch.save(model.state_dict(), weights)
    config.write_text(yaml.safe_dump(to_dict(model.cfg), sort_keys=True))
    return {"weights": str(weights), "config": str(config)}


def log_pyfunc(model: TNet, folder: Path, name: str = "model", registered_name: str | None = None,
               example: np.ndarray | None = None) -> Any:
    """Log the pyfunc model (with a signature inferred from ``example``) to the active run.

    The signature's image height and width are left free (-1): TNet squash-resizes any image, and
    a shape fixed by the example (e.g. 64 px base views) would make MLflow refuse real images.
    """
    from mlflow.models import infer_signature
    from mlflow.types.schema import Schema, TensorSpec

    artifacts = save_artifacts(model, folder)
    signature = None
    if example is not None:
        wrapper = TNetPyfunc()
        wrapper.cfg, wrapper.model = model.cfg, model.eval()
        signature = infer_signature(example, wrapper.predict(None, example), params={"locations": list(model.cfg.inference_locations)})
        signature.inputs = Schema([TensorSpec(example.dtype, (-1, -1, -1) + tuple(example.shape[3:]))])
    return mlflow.pyfunc.log_model(
        name=name, python_model=str(ENTRY), artifacts=artifacts, code_paths=CODE_PATHS,
        signature=signature, registered_model_name=registered_name, pip_requirements=pip_requirements(),
    )
