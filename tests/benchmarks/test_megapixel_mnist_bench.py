"""benchmarks/megapixel_mnist.py: its pure helpers, and one tiny end-to-end run of ``main``.

The tiny run trains TNet, the whole-image baseline and one ablation for about a second each on
256 px canvases (16 train, 8 test): accuracies mean nothing at that size; the contract checked is
the JSON the lead reads (keys, curves, FLOPs matched within 20%), the PNG, and that a second run
reuses the sharded data.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]


def load() -> ModuleType:
    """Import benchmarks/megapixel_mnist.py as a module (benchmarks/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_megapixel_mnist", ROOT / "benchmarks" / "megapixel_mnist.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_digits_inside_counts_whole_digits_only() -> None:
    mm = load()
    attended = np.array([[0.0, 0.0, 100.0, 100.0], [90.0, 90.0, 200.0, 200.0]])
    digits = np.array([
        [10.0, 10.0, 38.0, 38.0],  # inside the first
        [80.0, 80.0, 108.0, 108.0],  # straddles both, whole in neither
        [150.0, 150.0, 178.0, 178.0],  # inside the second
        [0.0, 0.0, 28.0, 28.0],  # touching the edge counts as inside
    ])  # fmt: skip
    assert mm.digits_inside(attended, digits) == 3
    assert mm.digits_inside(attended[:0], digits) == 0
    assert mm.digits_inside(attended, digits[:0]) == 0


def test_parse_ablation_keeps_commas_inside_values() -> None:
    mm = load()
    assert mm.parse_ablation("k1=model.locations=[1]") == ("k1", ["model.locations=[1]"])
    assert mm.parse_ablation("a-b=model.locations=[2,1],loss.w_ce=0.3") == (
        "a-b", ["model.locations=[2,1]", "loss.w_ce=0.3"])
    for bad in ("noequals", "name=", "=model.grid=3", "bad name=model.grid=3"):
        with pytest.raises(ValueError, match="--ablation"):
            mm.parse_ablation(bad)


def test_modes_pick_their_data_config_and_budget() -> None:
    mm = load()
    quick, full = mm.parse_args(["--quick"]), mm.parse_args([])
    assert (quick.size, quick.n_train, quick.n_test, quick.n_noise, quick.tile) == (640, 3000, 200, 9, 64)
    assert quick.config.endswith("megapixel_mnist_demo.yaml") and quick.eval_at[-1] <= quick.minutes
    assert (quick.jobs, quick.threads, full.jobs, full.threads) == (2, 1, 1, 2)
    assert mm.parse_args(["--quick", "--jobs", "1", "--threads", "2"]).jobs == 1  # flags beat the mode
    assert (full.size, full.n_train, full.n_test, full.n_noise, full.minutes) == (1500, 5000, 1000, 50, 60.0)
    assert full.eval_at == [5.0, 10.0, 30.0, 60.0] and full.config.endswith("megapixel_mnist.yaml")
    with pytest.raises(SystemExit):
        mm.parse_args(["--ablation", "broken"])


def test_a_config_for_several_workers_trains_one_process_with_their_summed_batch() -> None:
    """The demo config runs two DDP workers of 8 images; a benchmark arm is one process, so it
    takes 16 per step, and the per-worker image counts double with it."""
    mm = load()
    demo = mm.job_config(str(ROOT / "configs" / "megapixel_mnist_demo.yaml"), [], "unused")
    assert (demo.train.num_workers, demo.train.batch_size) == (1, 16)
    assert demo.model.explore_anneal_images == 12000
    three = mm.job_config(str(ROOT / "configs" / "megapixel_mnist.yaml"),
                          ["train.num_workers=3", "model.restart_heads_at=100"], "unused")
    assert (three.train.num_workers, three.train.batch_size, three.model.restart_heads_at) == (1, 48, 300)
    one = mm.job_config(str(ROOT / "configs" / "megapixel_mnist.yaml"), [], "unused")
    assert (one.train.num_workers, one.train.batch_size, one.model.restart_heads_at) == (1, 16, 16000)


TINY = ["--size", "256", "--n-train", "16", "--n-test", "8", "--n-noise", "3", "--minutes", "0.02",
        "--eval-at", "0", "--threads", "1",
        "--set", "model.input_size=256", "--set", "model.base_size=64", "--set", "model.grid=4",
        "--set", "model.overlap=0.3", "--set", "model.locations=[2]", "--set", "model.eval_locations=null", "--set", "train.batch_size=4",
        "--set", "data.shuffle_buffer=4", "--set", "train.recalibrate_norms=8"]  # fmt: skip


def test_tiny_run_writes_the_documented_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mm = load()
    data = tmp_path / "data"
    result = mm.main([*TINY, "--data", str(data), "--out-dir", str(tmp_path), "--ablation", "k1=model.locations=[1]",
                      "--locations", "1,3", "--json"])  # fmt: skip
    line = json.loads([x for x in capsys.readouterr().out.splitlines() if x.strip()][-1])
    for key in ("test_accuracy", "baseline_test_accuracy", "decoded_pixel_fraction", "minutes", "options",
                "target_digit_hit_rate", "curves", "flops", "machine", "versions", "settings", "ablation"):
        assert key in line, key
    assert line["test_accuracy"] == result["test_accuracy"] and line["minutes"] == 0.02
    assert set(line["options"]) == {"model", "loss"} and line["options"]["model"]["base_size"] == 64
    assert set(line["curves"]) == {"tnet", "baseline", "k1"}
    for name, curve in line["curves"].items():
        assert [p["checkpoint_minutes"] for p in curve] == [0.0, 0.02], name  # untrained, then at the budget
        assert [p["steps"] > 0 for p in curve] == [False, True], name
        assert all(0.0 <= p["accuracy"] <= 1.0 and p["images"] == 8 for p in curve), name
    assert 0.0 <= line["target_digit_hit_rate"] <= 1.0 and line["decoded_pixel_fraction"] > 0.0
    # training keys are found too (one dict for both splits): the trained-on cells are scored
    assert 0.0 <= line["curves"]["tnet"][-1]["train_target_digit_hit_rate"] <= 1.0
    assert "train_target_digit_hit_rate" not in line["curves"]["tnet"][0]  # untrained: no steps yet
    assert "train_target_digit_hit_rate" not in line["curves"]["baseline"][-1]
    growth = [p["backbone_kernel_growth"] for p in line["curves"]["tnet"]]
    assert growth[0] == 1.0 and growth[1] != 1.0  # the backbone's kernel norm against its initial one
    flops = line["flops"]
    assert 1 / 1.2 <= flops["baseline_gflops"] / flops["tnet_gflops"] <= 1.2, flops
    assert flops["baseline_input_size"] % 16 == 0
    ablation = line["ablation"]["k1"]
    assert ablation["overrides"] == ["model.locations=[1]"] and ablation["options"]["model"]["locations"] == [1]
    assert ablation["gflops"] < flops["tnet_gflops"]
    assert (tmp_path / "megapixel_mnist.json").exists() and (tmp_path / "megapixel_mnist.png").exists()
    for name in ("tnet", "k1"):  # attention pictures of every TNet arm, named in its last curve point
        picture = tmp_path / line["curves"][name][-1]["attention_png"]
        assert picture.name == f"megapixel_mnist.{name}.attention.png"
        from PIL import Image

        with Image.open(picture) as img:  # 6 test images, 3 per row, each the 64 px base view x 3
            assert img.size == (3 * 192, 2 * 192)
    assert "attention_png" not in line["curves"]["baseline"][-1]
    # --locations: the trained arms evaluated again with 1 and 3 cells; more cells decode more pixels
    sweep = line["curves"]["tnet"][-1]["by_locations"]
    assert set(sweep) == {"1", "3"} and set(line["accuracy_by_locations"]) == {"1", "3"}
    assert line["accuracy_by_locations"]["3"] == sweep["3"]["accuracy"]
    assert sweep["1"]["decoded_pixel_fraction"] < sweep["3"]["decoded_pixel_fraction"]
    assert sweep["1"]["target_digit_hit_rate"] <= sweep["3"]["target_digit_hit_rate"]
    assert set(line["curves"]["k1"][-1]["by_locations"]) == {"1", "3"} and "by_locations" not in line["curves"]["baseline"][-1]

    stamp = (data / "dataset.json").stat().st_mtime_ns
    options = {"size": 256, "n_train": 16, "n_test": 8, "n_noise": 3}
    assert mm.prepare_data(data, options, 64) == str(data)
    assert (data / "dataset.json").stat().st_mtime_ns == stamp, "same parameters: the data is reused"
    from pipeline.errors import DatasetError

    with pytest.raises(DatasetError, match="another --data"):
        mm.prepare_data(data, {**options, "n_noise": 4}, 64)


def test_jobs_train_the_arms_in_processes_of_their_own(tmp_path: Path) -> None:
    """``--jobs 2`` as a user runs it (a script: spawned processes re-import it by path): every arm trained."""
    import subprocess

    argv = [*TINY, "--data", str(tmp_path / "data"), "--out-dir", str(tmp_path), "--ablation", "k1=model.locations=[1]",
            "--jobs", "2", "--json"]  # fmt: skip
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "megapixel_mnist.py"), *argv],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(line["curves"]) == {"tnet", "baseline", "k1"} and line["settings"]["jobs"] == 2
    for name, curve in line["curves"].items():
        assert [p["steps"] > 0 for p in curve] == [False, True], name
    assert line["ablation"]["k1"]["accuracy"] == line["curves"]["k1"][-1]["accuracy"]
    with pytest.raises(SystemExit):
        load().parse_args(["--jobs", "0"])
    with pytest.raises(SystemExit):
        load().parse_args(["--locations", "0,2"])


def test_arms_trains_only_the_named_ones(tmp_path: Path) -> None:
    """An ablation study without retraining the headline arms: the JSON says which were left out (None)."""
    mm = load()
    anneal = "anneal=model.explore_scale_end=16,model.explore_anneal_images=8"
    result = mm.main([*TINY, "--data", str(tmp_path / "data"), "--out-dir", str(tmp_path),
                      "--ablation", "k1=model.locations=[1]", "--ablation", anneal, "--arms", "k1,anneal",
                      "--save-models"])  # fmt: skip
    assert set(result["curves"]) == {"k1", "anneal"} and set(result["ablation"]) == {"k1", "anneal"}
    # --save-models: each arm's trained weights beside the JSON, read back (weights only) into a
    # fresh model of the arm's config; the baseline arm was not trained, so it wrote nothing
    saved = tmp_path / result["curves"]["k1"][-1]["weights"]
    assert saved.name == "megapixel_mnist.k1.pt"
    cfg = mm.job_config(mm.FULL["config"], [*[TINY[i + 1] for i, a in enumerate(TINY) if a == "--set"],
                                            "model.locations=[1]"], str(tmp_path / "data"))  # fmt: skip
    fresh = mm.TNet(cfg.model)
    fresh.load_state_dict(torch.load(saved, weights_only=True))
    assert not (tmp_path / "megapixel_mnist.baseline.pt").exists()
    # the exploration scale in force at each checkpoint: the config's slow anneal (4 -> 64 over 13,000
    # images) has barely moved; the fast one (4 -> 16 over 8 images) is done
    # (how far it moved depends on how many images a fast machine trains in the budget)
    k1 = result["curves"]["k1"]
    assert k1[0]["explore_scale"] == 4.0 and k1[1]["train_images"] > 0
    assert k1[1]["explore_scale"] == pytest.approx(4.0 * 16 ** (k1[1]["train_images"] / 13000), rel=1e-6)
    assert k1[1]["explore_scale"] < 8.0
    assert [p["explore_scale"] for p in result["curves"]["anneal"]] == [4.0, 16.0]
    assert result["test_accuracy"] is None and result["baseline_test_accuracy"] is None
    assert 0.0 <= result["ablation"]["k1"]["accuracy"] <= 1.0
    for bad in (["--arms", "k2"], ["--arms", ","], ["--arms", "tnet,nope"]):
        with pytest.raises(SystemExit):
            mm.parse_args(bad)


def test_evaluation_recalibrates_the_norms_when_the_config_asks(tmp_path: Path) -> None:
    """``train.recalibrate_norms``: the benchmark evaluates as the training job does after an epoch."""
    from concurrent.futures import ThreadPoolExecutor

    mm = load()
    options = {"size": 256, "n_train": 16, "n_test": 8, "n_noise": 3}
    url = mm.prepare_data(tmp_path / "data", options, 64)
    sets = [TINY[i + 1] for i, a in enumerate(TINY) if a == "--set"]
    table = mm.digit_table(url, "test")
    assert {len(rows) for rows in table.values()} == {5} and {int(rows[:, 5].sum()) for rows in table.values()} == {3}
    for rows in table.values():  # the target digits' boxes are the rows flagged as targets, in order
        targets, boxes = mm.digit_boxes(rows), mm.digit_boxes(rows, targets_only=False)
        assert targets.shape == (3, 4) and boxes.shape == (5, 4)
        assert np.array_equal(targets, boxes[[i for i, row in enumerate(rows) if row[5] == 1]])
    with ThreadPoolExecutor(1) as pool:
        for n, changes in ((0, False), (8, True)):
            cfg = mm.job_config(mm.FULL["config"], [*sets, f"train.recalibrate_norms={n}"], url)
            arm = mm.TNetArm("tnet", cfg, url, pool, table)
            before = arm.model.level_norms.l1_0_running_mean.clone()
            row = arm.evaluate("test", None)
            after = arm.model.level_norms.l1_0_running_mean
            assert (not torch.equal(before, after)) is changes, n
            assert row["images"] == 8
            assert 0 <= row["digit_cell_fraction"] <= 1 and 0 <= row["cell_read_rate"] <= 1
            assert 0 <= row["digits_attended_per_image"] <= 5 and 0 <= row["target_cell_read_rate"] <= 1
            by_hits = row["accuracy_by_targets_attended"]  # every test image counted once, by its targets in view
            assert set(by_hits) <= {"0", "1", "2", "3"} and sum(r["images"] for r in by_hits.values()) == 8
            right = sum(r["accuracy"] * r["images"] for r in by_hits.values())
            assert abs(right / 8 - row["accuracy"]) < 1e-9


def test_reading_counts_cells_digits_and_what_each_head_names() -> None:
    """The reading metrics: a cell holding two digits is not scored; a digit inside two cells counts once."""
    from types import SimpleNamespace

    mm = load()
    table = {"a": np.array([[10, 10, 38, 38, 7, 1], [100, 100, 128, 128, 3, 0], [300, 300, 328, 328, 1, 1]], float)}
    cells = torch.tensor([[[0, 0, 50, 50], [5, 5, 60, 60], [90, 90, 200, 200], [0, 0, 400, 400], [500, 500, 600, 600]]])
    logits = torch.full((1, 5, 10), -1.0)
    for cell, named in enumerate([7, 2, 3, 3, 0]):
        logits[0, cell, named] = 1.0
    out = SimpleNamespace(selections=[SimpleNamespace(source_boxes=cells.double())], feature_logits=[None, logits])
    counts = mm.TNetArm.reading(SimpleNamespace(table=table), SimpleNamespace(keys=["a"]), out)
    # 5 cells; 4 hold a digit; cells 0-2 hold exactly one (7, 7, 3), heads name 7, 2, 3; digits seen: 7, 3, 1;
    # of the one-digit cells, 0 and 1 hold a target (the 7), and the head of cell 0 alone names it
    assert counts.tolist() == [5, 4, 3, 2, 3, 2, 1]
    unknown = mm.TNetArm.reading(SimpleNamespace(table=table), SimpleNamespace(keys=["b"]), out)  # no digits listed
    assert unknown.tolist() == [5, 0, 0, 0, 0, 0, 0]
    empty = SimpleNamespace(selections=[], feature_logits=[logits])
    assert mm.TNetArm.reading(SimpleNamespace(table=table), SimpleNamespace(keys=["a"]), empty).tolist() == [0] * 7


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 228), st.integers(0, 228)), max_size=6), st.integers(1, 16), st.integers(0, 9))
def test_oracle_cells_hold_every_digit_whole_when_k_allows(corners, k, seed) -> None:
    from tnet.geometry import candidate_grid, grid_boxes

    mm = load()
    grid = candidate_grid(256, 4, 0.5)  # 128 px cells at stride 43: every 28 px digit fits whole in one
    digits = np.array([[x, y, x + 28, y + 28] for x, y in corners], np.float64).reshape(-1, 4) / 256
    candidates = np.array(grid_boxes((0, 0, 256, 256), grid), np.float64) / 256
    picks = {place: mm.oracle_cells(digits, candidates, k, np.random.default_rng(seed), place) for place in ("centre", "edge")}
    centres = (candidates[:, :2] + candidates[:, 2:]) / 2
    for cells in picks.values():
        assert len(cells) == k == len(set(cells)) and all(0 <= c < grid.cells for c in cells)
        boxes = np.array([[*grid.cell_offset(c), *(np.array(grid.cell_offset(c)) + grid.patch)] for c in cells], np.float64)
        if len(corners) <= k:
            assert mm.digits_inside(boxes, digits * 256) == len(corners)
    if len(corners) == 1:  # the edge variant's cell lies no nearer the digit's centre than the centred one's,
        middle = (digits[0, :2] + digits[0, 2:]) / 2  # and farther whenever the holding cells' distances differ
        holding = np.flatnonzero(mm.containment(candidates, digits, 1e-6)[0])
        distances = ((centres[holding] - middle) ** 2).sum(1)
        far, near = (((centres[picks[p][0]] - middle) ** 2).sum() for p in ("edge", "centre"))
        assert far >= near
        assert far == distances.max() and near == distances.min()
    with pytest.raises(ValueError, match="place"):
        mm.oracle_cells(digits, candidates, k, np.random.default_rng(seed), "middle")


def test_oracle_arms_attend_every_target_digit(tmp_path: Path) -> None:
    """``--oracle``: TNet reads the labelled digits' cells, so evaluation attends all of them, in every
    variant (k = 6 cells hold the 3 target and 2 other digits of ``oracle_all``)."""
    mm = load()
    argv = [*TINY, "--set", "model.overlap=0.5", "--set", "model.locations=[6]", "--data", str(tmp_path / "data"),
            "--out-dir", str(tmp_path), "--oracle", "target", "all", "edge"]  # fmt: skip
    result = mm.main([*argv, "--arms", "oracle,oracle_all,oracle_edge"])
    assert set(result["curves"]) == {"oracle", "oracle_all", "oracle_edge"} and result["test_accuracy"] is None
    for curve in result["curves"].values():
        assert [p["target_digit_hit_rate"] for p in curve] == [1.0, 1.0]
    assert [p["digits_attended_per_image"] for p in result["curves"]["oracle_all"]] == [5.0, 5.0]
    assert result["oracle_test_accuracy"] == result["curves"]["oracle"][-1]["accuracy"]
    assert mm.parse_args([*TINY, "--oracle"]).oracle == ["oracle"]
    for bad in (["--arms", "oracle"], ["--ablation", "oracle=model.grid=5"], ["--oracle", "all", "--arms", "oracle"],
                ["--oracle", "middle"]):  # fmt: skip
        with pytest.raises(SystemExit):
            mm.parse_args(bad)


def oracle_setup(tmp_path: Path) -> tuple[Any, str, Any, dict[str, Any]]:
    """The benchmark module, a tiny dataset's URL, a config for oracle arms on it and its digit table."""
    mm = load()
    url = mm.prepare_data(tmp_path / "data", {"size": 256, "n_train": 16, "n_test": 8, "n_noise": 3}, 64)
    sets = [TINY[i + 1] for i, a in enumerate(TINY) if a == "--set"] + ["model.overlap=0.5", "model.locations=[6]",
                                                                       "data.augment=false"]  # crops may cut distractors
    cfg = mm.job_config(mm.FULL["config"], sets, url)
    table = mm.digit_table(url, "train")
    return mm, url, cfg, table


def test_oracle_delay_reads_the_modules_cells_until_the_images_are_trained(tmp_path: Path) -> None:
    """``--oracle-delay``: training reads the location module's own cells first, then the oracle's."""
    from concurrent.futures import ThreadPoolExecutor

    mm, url, cfg, table = oracle_setup(tmp_path)
    with ThreadPoolExecutor(1) as pool:
        arm = mm.OracleArm("oracle_all", cfg, url, pool, table, variant="all", delay=4)
        batch = next(iter(mm.make_loader(arm.spec("train", 0, True, 4), 4, 0)))
        arm.model.train()
        seen = []
        for _ in range(2):
            out = arm.forward(batch, batch.region_source(1, pool, True))
            seen.append(int(arm.reading(batch, out)[4]))  # distinct digits inside the attended cells
        with torch.no_grad():  # norm recalibration and evaluation do not count as training
            arm.forward(batch, batch.region_source(1, pool, True))
    assert arm.trained == 8
    assert seen[0] < 5 * len(batch) == seen[1]  # the module's own picks miss digits; the oracle's hold all five
    with pytest.raises(ValueError, match="delay"):
        mm.OracleArm("oracle_all", cfg, url, None, table, variant="all", delay=-1)
    assert mm.parse_args([*TINY, "--oracle", "all", "--oracle-delay", "100"]).oracle_delay == 100
    with pytest.raises(SystemExit):
        mm.parse_args([*TINY, "--oracle-delay", "-1"])


def test_oracle_reset_restarts_the_chosen_parts_at_the_switch(tmp_path: Path) -> None:
    """``--oracle-reset``: at the first oracle step the heads get new weights and Adam forgets, not before."""
    from concurrent.futures import ThreadPoolExecutor

    mm, url, cfg, table = oracle_setup(tmp_path)
    with ThreadPoolExecutor(1) as pool:
        arm = mm.OracleArm("oracle_all", cfg, url, pool, table, variant="all", delay=4, reset=["heads", "optimizer"])
        batch = next(iter(mm.make_loader(arm.spec("train", 0, True, 4), 4, 0)))
        arm.step(batch)  # the delay: the module's own cells, nothing reset
        assert arm.trained == 4 and arm.opt.state
        heads = [arm.model.classifier.weight, arm.model.feature_heads[1].weight, arm.model.weighting.weight]
        backbone = next(arm.model.backbone.parameters())
        with torch.no_grad():
            for w in heads:
                w.fill_(7.0)
        kept = backbone.detach().clone()
        arm.model.train()
        arm.forward(batch, batch.region_source(1, pool, True))  # the switch
    assert not arm.opt.state
    assert all(not torch.all(w.detach() == 7.0) and float(w.detach().abs().max()) < 1.0 for w in heads)
    assert torch.equal(backbone, kept)  # parts not named stay as trained
    for delay, reset in ((0, ["heads"]), (4, ["norms"])):  # a reset without a delay; an unknown part
        with pytest.raises(ValueError, match="reset"):
            mm.OracleArm("oracle_all", cfg, url, None, table, variant="all", delay=delay, reset=reset)
    assert mm.parse_args([*TINY, "--oracle", "all", "--oracle-delay", "9", "--oracle-reset", "heads"]).oracle_reset == ["heads"]
    with pytest.raises(SystemExit):
        mm.parse_args([*TINY, "--oracle", "all", "--oracle-reset", "heads"])
