"""Evaluate a registered model across numbers of locations, and promote candidate -> champion."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tnet.model import TNet
from tnet.profiling import profile
from training.config import DataConfig, JobConfig
from training.evaluation import evaluate_loader
from training.pictures import curve_png


@dataclass
class Assessment:
    model_uri: str
    accuracy: float
    accuracy_by_locations: dict[str, float] = field(default_factory=dict)
    gflops_by_locations: dict[str, float] = field(default_factory=dict)
    decoded_pixel_fraction: float = 0.0
    images_per_s: float = 0.0
    images: int = 0
    curve: str = ""


def parse_locations(text: str, levels: int) -> tuple[int, ...]:
    """"2" -> k=2 at every level; "2,1" -> per level. Raises ValueError naming the text."""
    try:
        parts = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise ValueError(f"--locations {text!r}: expected integers like 2 or 2,1") from None
    if len(parts) == 1:
        parts = parts * (levels - 1)
    if len(parts) != levels - 1:
        raise ValueError(f"--locations {text!r}: the model has {levels - 1} attention levels")
    return parts


def load_tnet(model_uri: str) -> TNet:
    loaded = mlflow.pyfunc.load_model(model_uri)
    return loaded.unwrap_python_model().model


def assess(model_uri: str, data: DataConfig, split: str, settings: Sequence[str] = (),
           limit: int | None = None, out_dir: Path | None = None, batch_size: int = 16) -> Assessment:
    model = load_tnet(model_uri)
    cfg = JobConfig(model=model.cfg, data=replace(data, val_split=split))
    default = ",".join(str(k) for k in model.cfg.inference_locations)
    options = list(dict.fromkeys([default, *settings]))
    result = Assessment(model_uri, 0.0)
    points = []
    with ThreadPoolExecutor(cfg.data.decode_threads) as pool:
        for text in options:
            locs = parse_locations(text, model.cfg.levels)
            ev = evaluate_loader(model, cfg, split, pool, limit=limit, locations=locs, batch_size=batch_size)
            name = ",".join(map(str, locs))
            gflops = profile(model.cfg, locs).gflops
            result.accuracy_by_locations[name] = ev.accuracy
            result.gflops_by_locations[name] = gflops
            points.append((gflops, ev.accuracy, name))
            if text == default:
                result.accuracy, result.images = ev.accuracy, ev.seen
                result.decoded_pixel_fraction = ev.summary()["decoded_pixel_fraction"]
                result.images_per_s = ev.summary()["images_per_s"]
    if out_dir is not None:
        points.sort()
        result.curve = str(curve_png(points, out_dir / "accuracy_vs_gflops.png", "GFLOPs per image", "accuracy"))
    return result


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return client.get_model_version_by_alias(name, alias).version
    except MlflowException:
        return None


def promote(client: MlflowClient, name: str, candidate_acc: float, champion_acc: float | None) -> dict[str, Any]:
    """Point "champion" at the candidate's version when it is strictly better (or there is none)."""
    cand = alias_version(client, name, "candidate")
    if cand is None:
        raise ValueError(f"models:/{name}@candidate: no such alias")
    if champion_acc is None or candidate_acc > champion_acc:
        client.set_registered_model_alias(name, "champion", cand)
        return {"promoted": True, "champion_version": cand}
    return {"promoted": False, "champion_version": alias_version(client, name, "champion")}
