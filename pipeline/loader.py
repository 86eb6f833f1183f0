"""The streaming training loader: shards -> samples -> base views, decode errors skipped and counted.

Splitting (documented choice: **epoch-sized streams**). Every (Ray Train rank, DataLoader worker)
pair is a *slot*. With at least as many shards as slots, slot s reads shards s, s + S, ... (in an
order shuffled per epoch with the run's seed); with fewer shards, every slot reads all of them and
keeps samples s, s + S, ... . No sample is read twice within a pass. Each slot then yields exactly
its quota (``samples_per_epoch / (world * workers)``), wrapping around its own stream when it runs
short, so every rank makes the same number of steps and DDP never waits on an exhausted rank.

Workers decode only the base view (the whole view at ``base_size``, from the pyramid's coarse
levels); the batch carries each sample's pyramid bytes so the model's deeper levels decode only
the tiles they select (``pipeline.lazy.PyramidRegionSource``).

``access="random"`` (``data.access: random``, for samples too big to stream): slots get manifest
rows instead of shards (``pipeline.random_access``), and the batch carries each sample's address
(``ranged.MemberRef``) instead of its bytes, so the header and the tiles actually used are the
only bytes fetched, by ranged requests. ``Batch.bytes_fetched()`` counts them (streaming mode: the
whole member) for the bytes-read fraction, logged like the decoded-pixel fraction.
"""

from __future__ import annotations

import json
import logging
import random
import tarfile
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from pipeline.dataset_files import MANIFEST, read_dataset_json
from pipeline.errors import FormatError, PipelineError
from pipeline.lazy import PyramidRegionSource, View, pixel_mean, random_view, to_model
from pipeline.pyramid import PyramidReader
from pipeline.random_access import cycle, manifest_rows, read_json_member, slot_rows
from pipeline.ranged import ByteCounter, MemberRef
from pipeline.storage import join, open_url
from pipeline.tarshard import check_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamSpec:
    """Plain data a DataLoader worker needs to produce its part of an epoch."""

    url: str
    split: str
    shards: tuple[str, ...]  # tar paths relative to url
    base_size: int
    channels: int
    quota: int  # samples this rank yields per epoch (split among its loader workers)
    rank: int = 0
    world: int = 1
    epoch: int = 0
    seed: int = 0
    train: bool = True  # shuffle (sample order per epoch); with ``augment``, random views too
    augment: bool = True  # with train: random crop, plus flip and jitter as below; False: the whole view
    flip: bool = True
    colour_jitter: bool = True
    crop_min_area: float = 0.85  # the random crop keeps this fraction of the area or more
    crop_max_aspect: float = 2.0  # and an aspect ratio in [1 / this, this]
    keep_objects: bool = False  # the crop holds every object box whole (``object_boxes``)
    shuffle_buffer: int = 128
    storage_options: dict[str, Any] = field(default_factory=dict)
    max_pixels: int = 2**34
    access: str = "stream"  # "stream": shards read whole, in order; "random": ranged reads per sample
    max_upsample: float = 1.0  # the base view may come from a level up to this factor short of base_size

    def __post_init__(self) -> None:
        if self.access not in ACCESS_MODES:
            raise ValueError(f"access={self.access!r}: must be one of {list(ACCESS_MODES)}")
        check_crop(self.crop_min_area, self.crop_max_aspect)


ACCESS_MODES = ("stream", "random")


def check_crop(min_area: float, max_aspect: float, prefix: str = "") -> None:
    """Raises ValueError naming the keys unless 0 < min_area <= 1 and max_aspect >= 1."""
    if not 0.0 < min_area <= 1.0 or max_aspect < 1.0:
        raise ValueError(f"{prefix}crop_min_area={min_area}, {prefix}crop_max_aspect={max_aspect}: "
                         "need 0 < crop_min_area <= 1 and crop_max_aspect >= 1")


@dataclass
class Prepared:
    key: str
    label: int
    tif: bytes | MemberRef  # the pyramid's bytes (stream) or where it lies (random)
    view: View
    base: torch.Tensor  # (C, b, b)
    decoded: int  # pixels decoded for the base view
    full: int  # level-0 pixels of the image
    fetched: int = 0  # bytes fetched for this sample so far (stream: the whole member)
    size: int = 0  # bytes of the pyramid member


class RegionReads(Protocol):
    """What a region read takes from a model config (``tnet.config.TNetConfig``)."""

    in_chans: int
    antialias: bool
    read_upsample: float


@dataclass
class Batch:
    keys: list[str]
    labels: torch.Tensor  # (B,)
    base_views: torch.Tensor  # (B, C, b, b) in [-1, 1]
    pyramids: list[bytes]
    views: list[View]
    base_decoded: int
    full_pixels: int
    skipped: int = 0  # samples that failed to decode since the previous batch of this worker
    errors: list[str] = field(default_factory=list)
    base_fetched: int = 0  # bytes the loader fetched for these samples (header + base view tiles)
    sample_bytes: int = 0  # bytes of these samples' pyramid members
    _counters: list[ByteCounter] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.keys)

    def region_source(self, channels: int, executor: Executor | None = None,
                      antialias: bool = True, max_upsample: float = 1.0) -> PyramidRegionSource:
        readers = [self._reader(t, k) for t, k in zip(self.pyramids, self.keys)]
        return PyramidRegionSource(readers, self.views, channels, self.base_views, self.base_decoded,
                                   executor, antialias, max_upsample)

    def model_source(self, model: RegionReads, executor: Executor | None = None) -> PyramidRegionSource:
        """The region source a TNet of config ``model`` reads: its channels, resizing and levels."""
        return self.region_source(model.in_chans, executor, model.antialias, model.read_upsample)

    def _reader(self, tif: bytes | MemberRef, key: str) -> PyramidReader:
        if isinstance(tif, MemberRef):  # random access: ranged reads, counted per batch
            counter = ByteCounter()
            self._counters.append(counter)
            return PyramidReader(tif.open(counter), where=key, defer_index=True)
        return PyramidReader(tif, where=key)

    def bytes_fetched(self) -> int:
        """Bytes fetched from storage for this batch: by the loader, plus by the region sources
        made so far (random access; in streaming mode the loader already read whole members)."""
        return self.base_fetched + sum(c.bytes for c in self._counters)


def split_shards(url: str, split: str, storage_options: dict[str, Any] | None = None) -> list[tuple[str, int]]:
    """(shard, samples) of a split, from the dataset's manifest; refuses unknown format versions.

    Raises:
        PipelineError: no dataset.json (incomplete dataset), unknown version or an empty split.
    """
    read_dataset_json(url, storage_options)
    fs, root = open_url(url, storage_options)
    with fs.open(join(root, MANIFEST), "rb") as f:
        table = pq.read_table(f, columns=["split", "shard"])
    counts: dict[str, int] = {}
    for s, shard in zip(table.column("split").to_pylist(), table.column("shard").to_pylist()):
        if s == split:
            counts[shard] = counts.get(shard, 0) + 1
    if not counts:
        raise PipelineError(f"{url}: split {split!r} has no samples")
    return sorted(counts.items())


def slot_plan(shards: Sequence[str], slot: int, slots: int, rng: random.Random) -> tuple[list[str], int | None]:
    """Shards one slot reads, and the sample stride it keeps (None: all samples of its shards)."""
    order = list(shards)
    rng.shuffle(order)
    if len(order) >= slots:
        return order[slot::slots], None
    return order, slots


class ShardStream(IterableDataset):
    def __init__(self, spec: StreamSpec) -> None:
        super().__init__()
        self.spec = spec

    def __iter__(self) -> Iterator[Prepared | PipelineError]:
        spec = self.spec
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        slot, slots = spec.rank * nw + wid, spec.world * nw
        quota = spec.quota // nw + (1 if wid < spec.quota % nw else 0)
        rng = random.Random(f"{spec.seed}-{spec.epoch}-{slot}")
        if spec.access == "random":
            yield from self._random_access(slot, slots, quota, rng)
            return
        shards, stride = slot_plan(spec.shards, slot, slots, random.Random(f"{spec.seed}-{spec.epoch}"))
        produced = 0
        while produced < quota:
            yielded_this_pass = 0
            for item in self._shuffled(self._samples(shards, stride, slot), rng):
                yield self._prepare(item, rng) if not isinstance(item, PipelineError) else item
                produced += 1
                yielded_this_pass += 1
                if produced >= quota:
                    return
            if yielded_this_pass == 0:
                return  # nothing readable at all: stop rather than spin

    def _samples(self, shards: list[str], stride: int | None, slot: int) -> Iterator[dict | PipelineError]:
        fs, root = open_url(self.spec.url, self.spec.storage_options)  # per worker: fork-safe
        position = 0
        for shard in shards:
            url = join(root, shard)
            try:
                with fs.open(url, "rb") as f:
                    files = (dict(m, __url__=url) for m in tar_file_iterator(f))
                    for sample in group_by_keys(files):
                        keep = stride is None or position % stride == slot
                        position += 1
                        if keep:
                            yield sample
            except (OSError, tarfile.TarError, ValueError) as exc:
                yield PipelineError(f"{url}: unreadable shard ({type(exc).__name__}: {exc})")

    def _random_access(self, slot: int, slots: int, quota: int, rng: random.Random) -> Iterator[Prepared | PipelineError]:
        spec = self.spec
        try:
            rows = manifest_rows(spec.url, spec.split, spec.storage_options)
        except (PipelineError, OSError, ValueError) as exc:
            yield PipelineError(f"{spec.url}: manifest unreadable ({type(exc).__name__}: {exc})")
            return
        mine = slot_rows(rows, slot, slots, random.Random(f"{spec.seed}-{spec.epoch}"), spec.train)
        for row in cycle(mine, quota):
            yield self._prepare_ref(row.key, row.label, row.ref, rng)

    def _prepare_ref(self, key: str, label: int, ref: MemberRef, rng: random.Random) -> Prepared | PipelineError:
        spec = self.spec
        counter = ByteCounter()
        try:
            f = ref.open(counter, record=True, where=f"{key} in {ref.url}/{ref.shard}")
            reader = PyramidReader(f, where=key, max_pixels=spec.max_pixels, defer_index=True)
            meta = read_json_member(ref, key, counter) if spec.train and spec.augment else {}
            prepared = self._base_view(key, label, reader, meta, rng)
            if isinstance(prepared, PipelineError):
                return prepared
            prepared.tif = MemberRef(ref.url, ref.shard, ref.offset, ref.size, ref.storage_options,
                                     tuple(f.chunks or ()))
            prepared.fetched, prepared.size = counter.bytes, ref.size
            return prepared
        except (KeyError, ValueError, json.JSONDecodeError, FormatError, OSError) as exc:
            return PipelineError(f"{key}: undecodable sample ({type(exc).__name__}: {exc})")

    def _base_view(self, key: str, label: int, reader: PyramidReader, meta: dict[str, Any],
                   rng: random.Random) -> Prepared | PipelineError:
        """The base view of a random-access sample (the same steps as ``_prepare``)."""
        try:
            view, base = self._view(reader, meta, rng)
            return Prepared(key, label, b"", view, base, reader.decoded_pixels, reader.full_pixels())
        except (KeyError, ValueError, FormatError, OSError) as exc:
            return PipelineError(f"{key}: undecodable sample ({type(exc).__name__}: {exc})")

    def _view(self, reader: PyramidReader, meta: dict[str, Any], rng: random.Random) -> tuple[View, torch.Tensor]:
        """The sample's view (random crop/flip/jitter in training, else whole) and its base pixels."""
        spec = self.spec
        if spec.train and spec.augment:
            view = random_view(reader.width, reader.height, rng, spec.flip, spec.colour_jitter,
                               area=(spec.crop_min_area, 1.0),
                               aspect=(1.0 / spec.crop_max_aspect, spec.crop_max_aspect),
                               objects=object_boxes(meta) or None, keep_objects=spec.keep_objects)
        else:
            view = View((0.0, 0.0, float(reader.width), float(reader.height)))
        pixels = reader.read_region(view.box, spec.base_size, fill=128, max_upsample=spec.max_upsample)
        mean = pixel_mean(pixels)
        view = View(view.box, view.flip, view.jitter, mean)
        return view, to_model(pixels, view, spec.channels)

    def _shuffled(self, items: Iterator[Any], rng: random.Random) -> Iterator[Any]:
        if not self.spec.train or self.spec.shuffle_buffer <= 1:
            yield from items
            return
        buf: list[Any] = []
        for item in items:
            buf.append(item)
            if len(buf) >= self.spec.shuffle_buffer:
                yield buf.pop(rng.randrange(len(buf)))
        rng.shuffle(buf)
        yield from buf

    def _prepare(self, sample: dict[str, Any], rng: random.Random) -> Prepared | PipelineError:
        spec = self.spec
        key = sample.get("__key__", "?")
        try:
            check_key(key, sample.get("__url__", ""))  # hostile member names never become file names
            meta = json.loads(sample["json"])
            label = int(sample["cls"])
            reader = PyramidReader(sample["tif"], where=key, max_pixels=spec.max_pixels)
            view, base = self._view(reader, meta, rng)
            return Prepared(key, label, sample["tif"], view, base, reader.decoded_pixels, reader.full_pixels(),
                            len(sample["tif"]), len(sample["tif"]))
        except (KeyError, ValueError, json.JSONDecodeError, FormatError, OSError) as exc:
            return PipelineError(f"{key}: undecodable sample ({type(exc).__name__}: {exc})")


def object_boxes(meta: dict[str, Any]) -> list[list[float]]:
    """A sample's class-defining object boxes (xyxy) in stored pixels, from its ``.json`` member:
    the source's ``boxes`` (fMoW's) and its target ``digits`` (Megapixel MNIST's; the other
    digits do not decide the label), scaled by ``scale`` (sources give source pixels,
    docs/format.md).

    Raises:
        ValueError: a box that is not four numbers.
    """
    inner = meta.get("meta", {})
    scale = float(meta.get("scale", 1.0))
    boxes = [b["box"] for b in inner.get("boxes", []) if "box" in b]
    boxes += [d["box"] for d in inner.get("digits", []) if d.get("target") and "box" in d]
    for b in boxes:
        if len(b) != 4:
            raise ValueError(f"object box {b} has {len(b)} numbers: expected x0, y0, x1, y1")
    return [[float(v) * scale for v in b] for b in boxes]


def collate(items: list[Prepared | PipelineError]) -> Batch | None:
    good = [i for i in items if isinstance(i, Prepared)]
    errors = [str(i) for i in items if isinstance(i, PipelineError)]
    if not good:
        return Batch([], torch.zeros(0, dtype=torch.long), torch.zeros(0), [], [], 0, 0, len(errors), errors)
    return Batch(
        keys=[g.key for g in good],
        labels=torch.tensor([g.label for g in good]),
        base_views=torch.stack([g.base for g in good]),
        pyramids=[g.tif for g in good],
        views=[g.view for g in good],
        base_decoded=sum(g.decoded for g in good),
        full_pixels=sum(g.full for g in good),
        skipped=len(errors),
        errors=errors,
        base_fetched=sum(g.fetched for g in good),
        sample_bytes=sum(g.size for g in good),
    )


def make_loader(spec: StreamSpec, batch_size: int, workers: int = 0) -> DataLoader:
    """A DataLoader over one rank's epoch; batches may hold fewer good samples when some failed."""
    return DataLoader(
        ShardStream(spec), batch_size=batch_size, num_workers=workers, collate_fn=collate,
        persistent_workers=False, multiprocessing_context="spawn" if workers else None,
    )
