"""Smoke tests of the benchmarks: each script's ``main`` at tiny sizes writes its JSON and PNG.

Timings are not checked (they mean nothing at these sizes); the contract is: the keys the lead
and docs/benchmarks.md read exist, keyed as documented, and the plots are written.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load(name: str) -> ModuleType:
    """Import benchmarks/NAME.py as a module (benchmarks/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def last_json_line(capsys: pytest.CaptureFixture[str]) -> dict:
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    return json.loads(lines[-1])


def test_tnet_config_extends_fmow_by_levels() -> None:
    lvf = load("lazy_vs_full")
    assert [lvf.tnet_config(r).levels for r in (448, 896, 1792, 3584)] == [2, 3, 4, 5]
    assert lvf.tnet_config(896).locations == (2, 1)
    assert lvf.tnet_config(3584).locations == (2, 1, 1, 1)
    assert lvf.tnet_config(3584).features_per_image == 9
    with pytest.raises(ValueError, match="resolution=1000"):
        lvf.tnet_config(1000)


def test_batch_per_resolution() -> None:
    lvf = load("lazy_vs_full")
    default = lvf.parse_args([])
    assert [lvf.batch_for(r, default) for r in (448, 896, 1792, 3584)] == [8, 8, 2, 2]
    assert {lvf.batch_for(r, lvf.parse_args(["--batch", "3"])) for r in (448, 3584)} == {3}


@pytest.mark.slow
def test_lazy_vs_full_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lvf = load("lazy_vs_full")
    result = lvf.main(["--resolutions", "448", "--backbone", "tiny", "--batch", "1", "--rounds", "1",
                       "--warmup", "0", "--images", "2", "--json", "--out-dir", str(tmp_path)])
    assert last_json_line(capsys) == json.loads(json.dumps(result, default=str))
    for key in ("speedup_vs_full_res", "speedup_vs_eager", "speedup_vs_full_res_train", "speedup_vs_eager_train"):
        assert set(result[key]) == {"448"} and result[key]["448"] > 0, key
    row = result["resolutions"]["448"]
    assert {"tnet_gflops", "full_res_gflops", "features_per_image", "load_avg_before"} <= set(row)
    assert row["batch"] == 1 and row["timings"]["tnet_lazy_infer"]["items"] == [1]
    assert row["timings"]["tnet_lazy_infer"]["decoded_px_per_image_mean"] > 0
    assert row["timings"]["tnet_eager_infer"]["decoded_px_per_image_mean"] >= 448 * 448
    assert (tmp_path / "lazy_vs_full.json").exists() and (tmp_path / "lazy_vs_full.png").exists()
    assert "load_avg" in result["machine"] and row["output_dtypes"]["tnet"] == "torch.float32"


@pytest.mark.slow
def test_lazy_vs_full_bf16_runs_every_variant_in_bf16(tmp_path: Path) -> None:
    lvf = load("lazy_vs_full")
    result = lvf.main(["--resolutions", "448", "--backbone", "tiny", "--batch", "1", "--rounds", "1",
                       "--warmup", "0", "--images", "2", "--bf16", "--out-dir", str(tmp_path)])
    assert result["settings"]["bf16"] is True and (tmp_path / "lazy_vs_full_bf16.json").exists()
    assert all(v > 0 for v in result["speedup_vs_eager"].values())
    row = result["resolutions"]["448"]
    assert row["output_dtypes"] == {"tnet": "torch.bfloat16", "full_res": "torch.bfloat16"}


def test_loader_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loader = load("loader")
    result = loader.main(["--resolutions", "896", "--images", "4", "--batch", "2", "--rounds", "1", "--json",
                          "--out-dir", str(tmp_path)])
    assert last_json_line(capsys)["fraction_of_decode_bound"] == result["fraction_of_decode_bound"]
    assert result["fraction_of_decode_bound"] > 0 and result["speedup_vs_webdataset_full_decode"] > 0
    row = result["resolutions"]["896"]
    assert row["tiles_match"], "the bound must decode exactly the tiles the loader decoded"
    assert (tmp_path / "loader.json").exists() and (tmp_path / "loader.png").exists()


def test_tnet_like_boxes_follow_the_grid() -> None:
    import random

    loader = load("loader")
    boxes = loader.tnet_like_boxes(896, 3, random.Random(0))
    assert [tuple(b.shape) for b in boxes] == [(3, 2, 4), (3, 2, 4)]  # k = 2, then 1 per region
    sides = [float((b[..., 2] - b[..., 0]).mean()) for b in boxes]
    assert sides == pytest.approx([0.5, 0.25])  # 448 then 224 px of 896


def test_accuracy_complexity_quick_untrained(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    acc = load("accuracy_complexity")
    result = acc.main(["--quick", "--locations", "1", "--limit", "4", "--json", "--out-dir", str(tmp_path)])
    assert last_json_line(capsys)["untrained"] is True
    assert "note" in result
    points = {p["locations"]: p for p in result["points"]}
    assert set(points) == {"2", "1"}  # the model's own k first, then the sweep
    assert points["1"]["gflops"] < points["2"]["gflops"]
    assert all(0.0 <= p["accuracy"] <= 1.0 and p["images"] == 4 for p in points.values())
    assert (tmp_path / "accuracy_complexity.quick.png").exists()


def test_accuracy_complexity_needs_data_with_model() -> None:
    acc = load("accuracy_complexity")
    with pytest.raises(SystemExit):
        acc.parse_args(["--model", "models:/x@champion"])


@pytest.mark.slow
def test_ddp_scaling_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = load("ddp_scaling")
    result = bench.main(["--n-train", "24", "--images", "4", "--batch", "2", "--warmup-steps", "1", "--rounds", "1",
                         "--variants", "one_thread,independent,ddp", "--data", str(tmp_path / "data"),
                         "--set", "train.cpu_bf16=never", "--json", "--out-dir", str(tmp_path)])
    assert last_json_line(capsys) == json.loads(json.dumps(result, default=str))
    assert set(result["images_per_s"]) == {"one_thread", "independent", "ddp"}
    assert all(v > 0 for v in result["images_per_s"].values())
    ddp = result["rounds"]["ddp"][0]["processes"]
    assert sorted(p["rank"] for p in ddp) == [0, 1] and all(p["images"] == 4 for p in ddp)
    assert result["speedup_vs_one_thread"]["one_thread"] == 1.0 and result["ddp_vs_independent"] > 0
    assert result["variants"]["ddp"] == {"processes": 2, "torch_threads": 1, "ddp": True, "batch_per_process": 2}
    assert (tmp_path / "ddp_scaling.json").exists() and (tmp_path / "ddp_scaling.png").exists()


def test_ddp_scaling_rejects_unknown_variants() -> None:
    bench = load("ddp_scaling")
    with pytest.raises(SystemExit):
        bench.parse_args(["--variants", "one_thread,three_threads"])
    assert bench.parse_args(["--quick"]).images == 240
