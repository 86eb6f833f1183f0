"""The training job's config (training/config.py): crop settings are checked and reach the loader."""

from __future__ import annotations

import pytest

from training.config import load_job_config
from training.loop import epoch_spec


@pytest.mark.parametrize("override, key", [("data.crop_min_area=0", "data.crop_min_area=0.0"),
                                           ("data.crop_min_area=1.5", "data.crop_min_area=1.5"),
                                           ("data.crop_max_aspect=0.9", "data.crop_max_aspect=0.9")])
def test_bad_crop_settings_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        load_job_config("configs/megapixel_mnist.yaml", [override])


def test_crop_settings_reach_the_training_stream() -> None:
    cfg = load_job_config("configs/megapixel_mnist.yaml", ["data.augment=true", "data.keep_objects=true",
                                                           "data.crop_min_area=0.6", "data.crop_max_aspect=1.5"])
    spec = epoch_spec(cfg, [("train/shard-000000.tar", 10)], quota=10, rank=0, world=1, epoch=3)
    assert (spec.augment, spec.keep_objects, spec.crop_min_area, spec.crop_max_aspect) == (True, True, 0.6, 1.5)
    paper = load_job_config("configs/fmow_896.yaml")  # the paper's crop unless a config says otherwise
    assert (paper.data.crop_min_area, paper.data.crop_max_aspect, paper.data.keep_objects) == (0.85, 2.0, False)
