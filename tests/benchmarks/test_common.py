"""Benchmark results are committed: they must not carry this machine's paths."""

import json
from pathlib import Path

from benchmarks.common import REPO, write_json


def test_write_json_makes_project_paths_relative_and_leaves_others(tmp_path: Path) -> None:
    result = {
        "config": str(REPO / "configs" / "megapixel_mnist_demo.yaml"),
        "runs": [{"url": REPO / "benchmarks" / ".cache" / "d"}, {"url": "s3://bucket/d"}],
        "elsewhere": "/opt/data/x.tif",
        "lookalike": f"{REPO}-other/file",
        "n": 3,
    }
    written = json.loads(write_json(result, tmp_path / "r.json").read_text())
    assert written == {
        "config": "configs/megapixel_mnist_demo.yaml",
        "runs": [{"url": "benchmarks/.cache/d"}, {"url": "s3://bucket/d"}],
        "elsewhere": "/opt/data/x.tif",
        "lookalike": f"{REPO}-other/file",
        "n": 3,
    }
