"""``train_loop_per_worker``: what every Ray Train worker runs.

Kept importable and free of driver concerns so a test can run it with one or two CPU workers.
Rank 0 alone talks to MLflow (through the run id the driver created, so retries and resumes keep
one run). Every rank reports the same number of times (Ray Train requires it); rank 0 attaches the
checkpoint. A checkpoint holds only tensors and plain numbers (loaded with ``weights_only=True``).

Corrupt data never stops a run below ``data.max_bad_fraction``: a sample the loader cannot decode
is skipped; a tile found corrupt only when the model reads it (the loader decodes just the base
view) is read as mid-grey (``TolerantRegionSource``). Both are counted over all ranks
(``train_skipped``, ``train_damaged``) and listed with their reasons in the MLflow artifact
``data_errors/epoch-NNN.json``. With several ranks, a step in which one rank has no decodable
sample is skipped by all of them (DDP's all-reduce needs every rank); the other ranks' samples of
that step are counted (``train_set_aside``) and listed there too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from torch import nn

from pipeline.loader import StreamSpec, make_loader, split_shards
from tnet.levelnorm import recalibrating_norms
from tnet.losses import TNetLoss
from tnet.model import TNet
from training.config import JobConfig, job_config_from_dict
from training.data_errors import TolerantRegionSource, error_entries, every_rank_has, gather_json
from training.evaluation import evaluate_loader
from training.optim import lr_at, make_optimizer
from training.precision import apply_layout, autocast, autocast_dtype
from training.tracking import RankZeroTracker

log = logging.getLogger(__name__)
CHECKPOINT_FILE = "state.pt"
SET_ASIDE = "set aside: another rank had no decodable sample in the same step (DDP ranks step together)"


def epoch_quota(cfg: JobConfig, shards: list[tuple[str, int]], world: int) -> int:
    """Samples each rank yields per epoch: equal for all ranks (DDP needs equal step counts)."""
    total = cfg.data.samples_per_epoch or sum(n for _, n in shards)
    per_rank = max(total // world, 1)
    if cfg.train.max_steps_per_epoch:
        per_rank = min(per_rank, cfg.train.max_steps_per_epoch * cfg.train.batch_size)
    return per_rank


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """Torch's seed for one epoch of one rank, so the epoch's random draws (dropout, Gumbel
    exploration) do not depend on what ran before it: a run resumed at epoch e from a checkpoint
    draws what an uninterrupted run draws in epoch e, and ends with the same weights."""
    return random.Random(f"{seed}-{rank}-{epoch}").getrandbits(63)


def debug_record(folder: str | None, name: str, data: dict[str, Any]) -> None:
    """What this rank did, as ``folder/name`` (JSON), when ``train.debug_dir`` asks: lets tests of
    the distributed behaviour see each rank's process, node and samples."""
    if folder:
        Path(folder, name).write_text(json.dumps(data))


def save_state(path: str, model: nn.Module, opt: torch.optim.Optimizer, loss: TNetLoss, epoch: int,
               metrics: dict[str, float]) -> None:
    torch.save({"model": _unwrap(model).state_dict(), "optimizer": opt.state_dict(),
                "loss": loss.state_dict(), "epoch": epoch, "metrics": metrics}, path)


def load_state(path: str) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def epoch_spec(cfg: JobConfig, shards: list[tuple[str, int]], quota: int, rank: int, world: int,
               epoch: int) -> StreamSpec:
    """This rank's training stream for ``epoch``."""
    return StreamSpec(
        url=cfg.data.url, split=cfg.data.train_split, shards=tuple(s for s, _ in shards),
        base_size=cfg.model.base_size, channels=cfg.model.in_chans, quota=quota, rank=rank, world=world,
        epoch=epoch, seed=cfg.train.seed, augment=cfg.data.augment, flip=cfg.data.flip,
        colour_jitter=cfg.data.colour_jitter, crop_min_area=cfg.data.crop_min_area,
        crop_max_aspect=cfg.data.crop_max_aspect, keep_objects=cfg.data.keep_objects, shuffle_buffer=cfg.data.shuffle_buffer,
        storage_options=dict(cfg.data.storage_options), access=cfg.data.access,
        max_upsample=cfg.model.read_upsample,
    )


def recalibrate(model: nn.Module, cfg: JobConfig, spec: StreamSpec, executor: ThreadPoolExecutor) -> None:
    """Recompute the norms' running statistics from ``train.recalibrate_norms`` training samples:
    each rank its share (the epoch's order, no augmentation; unreadable ones are skipped), then
    the ranks' statistics are pooled, so every rank and the checkpoint hold those of all samples."""
    share = max(cfg.train.recalibrate_norms // spec.world, 1)
    recal = dataclasses.replace(spec, quota=min(share, spec.quota), train=False, flip=False, colour_jitter=False)
    with recalibrating_norms(model), torch.no_grad():
        for batch in make_loader(recal, cfg.train.batch_size, cfg.data.loader_workers):
            if len(batch):
                model(TolerantRegionSource(batch.model_source(cfg.model, executor),
                                           batch.keys))
    pool_norm_stats(model, spec.world)


def pool_norm_stats(model: nn.Module, world: int) -> None:
    """Every rank's recomputed norm statistics replaced by their mean over all ranks, weighted by
    each rank's batch count (a collective: all ranks call it).

    Why exact: with ``momentum=None`` a norm's running mean and variance are the plain averages of
    its batches' statistics, so the count-weighted mean of the ranks' averages is the average over
    every batch of every rank, what one process would compute from all the samples. A rank that
    read nothing has count 0 and no weight. Without it, rank 0 (whose weights are checkpointed and
    evaluated) kept the statistics of its own share only.
    """
    if world == 1 or not torch.distributed.is_initialized():
        return
    buffers = dict(model.named_buffers())
    stats = [(buffers[name], buffers[name.rsplit("running_", 1)[0] + "num_batches_tracked"])
             for name in buffers if name.endswith(("running_mean", "running_var"))]
    if not stats:
        return
    counts = torch.stack([count.double() for _, count in stats])  # read before any is overwritten
    flat = torch.cat([counts] + [stat.double().flatten() * count.double() for stat, count in stats])
    torch.distributed.all_reduce(flat)
    total, offset = flat[: len(stats)], len(stats)
    for (stat, count), n in zip(stats, total.tolist()):
        part = flat[offset: offset + stat.numel()]
        offset += stat.numel()
        if n > 0:
            stat.copy_((part / n).view_as(stat))
        count.fill_(int(n))  # the batches behind the pooled statistics


def train_step(model: nn.Module, loss_fn: TNetLoss, opt: torch.optim.Optimizer, source: Any, labels: torch.Tensor,
               device: torch.device, amp_dtype: torch.dtype | None) -> tuple[Any, dict[str, torch.Tensor]]:
    """One optimiser step on one batch (also what benchmarks/ddp_scaling.py times); returns TNet's
    output and the loss terms."""
    with autocast(device, amp_dtype):
        out = model(source)
        terms = loss_fn(out, labels)
    opt.zero_grad(set_to_none=True)
    terms["total"].backward()
    opt.step()
    loss_fn.update_baseline(terms)
    return out, terms


def train_loop_per_worker(config: dict[str, Any]) -> None:
    cfg = job_config_from_dict(config["job"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = cfg.train.torch_threads or max(int(cfg.train.cpus_per_worker), 1)
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.train.seed + rank)
    device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")

    model = apply_layout(TNet(cfg.model), cfg.train.channels_last)
    loss_fn = TNetLoss(cfg.loss).to(device)
    opt = make_optimizer(model, cfg.train)
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_state(os.path.join(d, CHECKPOINT_FILE))
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        loss_fn.load_state_dict(state["loss"])
        start_epoch = int(state["epoch"]) + 1
        log.info("rank %d resumed from epoch %d", rank, start_epoch)
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True}) \
        if world > 1 else model.to(device)
    debug_record(cfg.train.debug_dir, f"start-rank{rank}-pid{os.getpid()}.json",
                 {"rank": rank, "world": world, "pid": os.getpid(), "start_epoch": start_epoch,
                  "node_id": ray.get_runtime_context().get_node_id()})
    tracker = RankZeroTracker(config.get("tracking_uri"), config.get("run_id")) if rank == 0 else None
    train_shards = split_shards(cfg.data.url, cfg.data.train_split, cfg.data.storage_options)
    quota = epoch_quota(cfg, train_shards, world)
    executor = ThreadPoolExecutor(cfg.data.decode_threads)
    amp_dtype = autocast_dtype(device, cfg.train)
    if rank == 0:
        log.info("training step precision: %s", amp_dtype or torch.float32)
    step_global = start_epoch * -(-quota // cfg.train.batch_size)

    for epoch in range(start_epoch, cfg.train.epochs):
        torch.manual_seed(epoch_seed(cfg.train.seed, rank, epoch))
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg.train, epoch)
        spec = epoch_spec(cfg, train_shards, quota, rank, world, epoch)
        model.train()
        sums: dict[str, float] = {}
        seen = decoded = full = fetched = sample_bytes = 0
        keys: list[str] = []
        bad: list[str] = []  # the loader's errors: "<key>: <reason>"
        set_aside: list[str] = []  # good samples of steps that a rank with an empty batch made all skip
        damaged: dict[str, str] = {}
        t0 = time.monotonic()
        for step, batch in enumerate(make_loader(spec, cfg.train.batch_size, cfg.data.loader_workers)):
            bad += batch.errors
            for err in batch.errors:
                log.warning("skipped: %s", err)
            # DDP all-reduces the gradients of every step across ranks: a rank whose whole batch
            # failed to decode cannot step alone, so when one has nothing, every rank skips the
            # step and the others' samples are set aside (counted and listed, never silent).
            if not every_rank_has(len(batch) > 0, world, device):
                for key in batch.keys:
                    log.warning("%s: %s", key, SET_ASIDE)
                set_aside += batch.keys
                continue
            source = TolerantRegionSource(batch.model_source(cfg.model, executor),
                                          batch.keys)
            labels = batch.labels.to(device)
            if step_global * cfg.train.batch_size * world < cfg.train.warmup_images:
                for group in opt.param_groups:  # counted in full batches, so a resumed run ramps alike
                    group["lr"] = lr_at(cfg.train, epoch, (step_global + 1) * cfg.train.batch_size * world)
            out, terms = train_step(model, loss_fn, opt, source, labels, device, amp_dtype)
            for key, reason in source.damaged.items():
                log.warning("damaged (read as grey): %s", reason)
                damaged.setdefault(key, reason)
            n = len(batch)
            seen += n
            keys += batch.keys
            decoded += source.decoded_pixels()
            full += batch.full_pixels
            fetched += batch.bytes_fetched()
            sample_bytes += batch.sample_bytes
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach()) * n
            for level, lg in enumerate(out.level_logits):
                correct = float((lg.argmax(-1) == labels).float().sum())
                sums[f"acc_level{level}"] = sums.get(f"acc_level{level}", 0.0) + correct
            step_global += 1
            if tracker and step % cfg.train.log_every == 0:
                tracker.log({f"step/{k}": float(v.detach()) for k, v in terms.items()} | {
                    "step/decoded_pixel_fraction": source.decoded_pixels() / max(batch.full_pixels, 1),
                    "step/bytes_read_fraction": batch.bytes_fetched() / max(batch.sample_bytes, 1),
                    "step/images_per_s": seen * world / max(time.monotonic() - t0, 1e-9),
                    "step/lr": opt.param_groups[0]["lr"],
                }, step_global)
        elapsed = time.monotonic() - t0
        ranks = gather_json({"skipped": error_entries(bad), "damaged": error_entries(list(damaged.values())),
                             "set_aside": [{"where": k, "reason": SET_ASIDE} for k in set_aside], "seen": seen},
                            world, device)
        data_errors = {name: [e for r in ranks for e in r[name]] for name in ("skipped", "damaged", "set_aside")}
        skipped, seen_all = len(data_errors["skipped"]), sum(r["seen"] for r in ranks)
        if skipped > seen_all * cfg.data.max_bad_fraction and skipped > 0:  # all ranks raise together
            raise RuntimeError(f"{cfg.data.url}: {skipped} undecodable samples this epoch, "
                               f"over data.max_bad_fraction={cfg.data.max_bad_fraction}")
        if cfg.train.recalibrate_norms:
            recalibrate(_unwrap(model), cfg, spec, executor)
        debug_record(cfg.train.debug_dir, f"epoch{epoch}-rank{rank}-pid{os.getpid()}.json",
                     {"rank": rank, "epoch": epoch, "pid": os.getpid(), "keys": keys})
        metrics = {f"train_{k}": v / max(seen, 1) for k, v in sums.items()}
        metrics |= {"epoch": epoch, "train_images_per_s": seen * world / max(elapsed, 1e-9),
                    "train_decoded_pixel_fraction": decoded / max(full, 1), "train_skipped": len(data_errors["skipped"]),
                    "train_damaged": len(data_errors["damaged"]), "train_set_aside": len(data_errors["set_aside"]),
                    "train_bytes_read_fraction": fetched / max(sample_bytes, 1),
                    "lr": lr_at(cfg.train, epoch), "train_bf16": float(amp_dtype == torch.bfloat16)}
        if device.type == "cuda":
            metrics["gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        if rank == 0:
            val = evaluate_loader(_unwrap(model), cfg, cfg.data.val_split, executor, device,
                                  limit=cfg.data.val_samples)
            metrics |= {f"val_{k}": v for k, v in val.summary().items()}
            assert tracker is not None
            tracker.log(metrics, epoch)
            if any(data_errors.values()):
                tracker.log_dict({"epoch": epoch, **data_errors}, f"data_errors/epoch-{epoch:03d}.json")
            with tempfile.TemporaryDirectory() as d:
                save_state(os.path.join(d, CHECKPOINT_FILE), model, opt, loss_fn, epoch, metrics)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)
    executor.shutdown()
