"""Dataset sources and their registry: ``make_source(name, src, options)`` builds one from plain data.

Options are what a YAML config or ``--set`` carries (strings, numbers, booleans, dicts); each
source validates its own values. ``storage_options`` is passed to fsspec for every file the
source reads (e.g. ``{"endpoint_url": ..., "anon": false}`` for S3-compatible stores).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

from pipeline.sources.base import Source
from pipeline.sources.fmow import FMoW
from pipeline.sources.folder import ImageFolder
from pipeline.sources.imagenet import ImageNet
from pipeline.sources.megapixel_mnist import URI_PREFIX, MegapixelMNIST, MegapixelMNISTParams
from pipeline.sources.slides import Slides


def _megapixel_mnist(src: str | None, options: dict[str, Any]) -> MegapixelMNIST:
    if src not in (None, "", URI_PREFIX):
        raise ValueError(f"megapixel-mnist src={src!r}: the dataset is generated; give no source")
    known = [f.name for f in dataclasses.fields(MegapixelMNISTParams)]
    _check_known("megapixel-mnist", options, known)
    return MegapixelMNIST(MegapixelMNISTParams(**options))


def _file_source(cls: type) -> Callable[[str | None, dict[str, Any]], Any]:
    def build(src: str | None, options: dict[str, Any]) -> Any:
        if not src:
            raise ValueError(f"{cls.name}: a dataset root (local path or URL) is required")
        params = inspect.signature(cls.__init__).parameters
        known = [p for p, spec in params.items() if spec.kind is inspect.Parameter.KEYWORD_ONLY]
        _check_known(cls.name, options, known)
        return cls(src, **options)

    return build


def _check_known(name: str, options: dict[str, Any], known: list[str]) -> None:
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {unknown}; known: {sorted(known)}")


# Write-once registry: dataset name -> builder(src, options).
SOURCES: MappingProxyType[str, Callable[[str | None, dict[str, Any]], Source]] = MappingProxyType(
    {
        "megapixel-mnist": _megapixel_mnist,
        "fmow": _file_source(FMoW),
        "imagenet": _file_source(ImageNet),
        "folder": _file_source(ImageFolder),
        "slides": _file_source(Slides),
    }
)


def make_source(name: str, src: str | None, options: dict[str, Any] | None = None) -> Source:
    """The source ``name`` reading ``src`` (a root path/URL; None for generated datasets).

    Raises:
        ValueError: unknown dataset name, unknown option, or an invalid option value.
    """
    if name not in SOURCES:
        raise ValueError(f"dataset={name!r}: unknown; known datasets: {sorted(SOURCES)}")
    return SOURCES[name](src, dict(options or {}))


__all__ = [
    "SOURCES",
    "FMoW",
    "ImageFolder",
    "ImageNet",
    "MegapixelMNIST",
    "MegapixelMNISTParams",
    "Slides",
    "make_source",
]
