"""The Ray Train loop: model-agnostic, short, resumable.

    load the latest checkpoint (if any) -> loop over `system.training_step(batch)` with gradient
    accumulation, clipping and a warm-up + polynomial-decay schedule -> checkpoint every N steps
    (model, optimizer, scheduler, step, RNG, config) -> rank 0 logs every step to MLflow.

A *system* (:class:`System`) bundles a model for one device with its objective; this file applies
distribution
(DDP or FSDP, :mod:`vidray.train.parallel`), precision and the optimizer in one place.

Resumption: the run's name is stable (given, or derived from the config), so both Ray Train's
own restarts (``FailureConfig.max_failures``, e.g. a killed worker) and a rerun of the same
command start from the latest checkpoint, and the step counter continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import random
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from typing import Any, Callable, Protocol

import numpy as np
import torch

from vidray import storage
from vidray.checkpoint import CHECKPOINT_FILE, read_checkpoint
from vidray.config import redact
from vidray.notes import note
from vidray.tracking import find_run, use_experiment
from vidray.train.parallel import compile_layers, full_state, load_full_state, local_value, parallelize


def log(message: str) -> None:
    """A worker's note, in its log file (stderr; on the driver too with ``--verbose``)."""
    print(f"[vidray] {message}", file=sys.stderr, flush=True)


# Dense bf16 peak of one GPU, TFLOP/s (vendor datasheets, without sparsity): the denominator of
# the MFU logged on GPU runs. Matched against torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0, "L4": 121.0}


def peak_tflops(device_name: str) -> float | None:
    return next((peak for name, peak in PEAK_BF16_TFLOPS.items() if name in device_name), None)


def warmup_poly_decay(warmup_steps: int, total_steps: int, power: float = 1.0) -> Callable[[int], float]:
    """LR multiplier: linear warm-up to 1, then polynomial decay to 0 at ``total_steps``."""
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        remaining = max(total_steps - step, 0) / max(total_steps - warmup_steps, 1)
        return remaining ** power
    return factor


def rng_state(generator: torch.Generator | None = None) -> dict:
    """Every RNG's state as tensors and plain values (what ``weights_only`` loading accepts),
    with ``generator``'s (a system's own draws: masks, pairings) where it has one."""

    name, keys, position, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
            **({"generator": generator.get_state()} if generator is not None else {})}


def set_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def save_checkpoint(directory: str, model_state: dict, optimizer_state: dict, scheduler, step: int,
                    config: dict, extra: dict | None = None, rng: dict | None = None) -> str:
    """``state.pt``: tensors and plain values only, so it loads with ``weights_only=True``; the
    config with credentials masked. ``rng``: :func:`rng_state` (default: without a generator)."""
    path = os.path.join(directory, CHECKPOINT_FILE)
    torch.save({"model": model_state, "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(), "step": step, "rng": rng or rng_state(),
                "config": redact(config), **(extra or {})}, path)
    return path


def load_checkpoint(directory: str) -> dict:
    path = os.path.join(directory, CHECKPOINT_FILE)
    return read_checkpoint(path, path)


class MLflowRun:
    """Rank 0's MLflow run, found again by its run name when a job resumes (so curves continue).

    Metrics go out from a background thread, so a tracking server that goes down never stalls
    training: the thread warns once, retries with backoff (1 s doubling to 10 s) and sends what
    waited, in order, when the server answers again. :meth:`finish` waits for it, up to
    ``VIDRAY_MLFLOW_FLUSH_S`` seconds (default 600), then says how many points it could not send.
    """

    def __init__(self, tracking_uri: str | None, experiment: str, run_name: str, params: dict,
                 tags: dict, metric_prefix: str = ""):

        import mlflow

        self.mlflow, self.metric_prefix = mlflow, metric_prefix
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        use_experiment(experiment)
        found = find_run(None, experiment, run_name)
        if found:
            self.run = mlflow.start_run(run_id=found.info.run_id)
        else:
            # Shown as tags' mlflow.runName when given (a sweep's "finetune mmm_ratio=0.5"), found by run_name.
            self.run = mlflow.start_run(run_name=tags.get("mlflow.runName", run_name),
                                        tags={"vidray.run_name": run_name, **tags})
            mlflow.log_params(params)
        # Our sender retries on its own schedule; MLflow's default (7 retries, backoff factor 2)
        # would hold each attempt for minutes before we could say the server is down.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        self.client = mlflow.MlflowClient()
        self.pending: queue.Queue = queue.Queue()
        self.unsent = 0
        self.sender = threading.Thread(target=self._send_until_closed, name="vidray-mlflow", daemon=True)
        self.sender.start()

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def log(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        self.pending.put([Metric(self.metric_prefix + k, float(v), timestamp, step) for k, v in metrics.items()])

    def _send_until_closed(self) -> None:
        unsent: list = []
        delay, down_since, closing = 1.0, None, False
        while not closing or unsent:
            batches = [] if unsent else [self.pending.get()]  # block for work only when none waits
            while True:
                try:
                    batches.append(self.pending.get_nowait())
                except queue.Empty:
                    break
            closing = closing or None in batches
            unsent.extend(m for batch in batches if batch for m in batch)
            self.unsent = len(unsent)
            if not unsent:
                continue
            chunk = unsent[:1000]  # MLflow's log_batch limit
            try:
                self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)
            except Exception as err:  # noqa: BLE001 - the server being down must not stop training
                if down_since is None:
                    down_since = time.monotonic()
                    note(f"WARNING: MLflow at {redact(self.mlflow.get_tracking_uri())} is not answering "
                        f"({type(err).__name__}); training goes on, metrics wait and are sent when it is back")
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            del unsent[:len(chunk)]
            self.unsent = len(unsent)
            if down_since is not None and not unsent:
                note(f"MLflow answers again after {time.monotonic() - down_since:.0f} s; every waiting metric sent")
                down_since, delay = None, 1.0

    def finish(self, status: str = "FINISHED") -> None:
        self.pending.put(None)
        self.sender.join(float(os.environ.get("VIDRAY_MLFLOW_FLUSH_S", "600")))
        if self.sender.is_alive():
            note(f"WARNING: MLflow at {redact(self.mlflow.get_tracking_uri())} did not come back: {self.unsent} "
                f"metric points of run {self.run_id} were not logged (the checkpoints are safe)")
            return
        self.mlflow.end_run(status=status)


class System(Protocol):
    """What the loop needs of a model and its objective; ``build_system(cfg, device)`` makes one per
    worker (VLM's: :mod:`vidray.train.vlm_system`, :mod:`vidray.train.vlm_finetune`; the frames recipes':
    ``vidray.train.frames_system.RECIPES``).

    - ``model``: an ``nn.Module`` whose forward returns ``(loss, logs)``, so DDP and FSDP wrap all
      that touches parameters; the networks in it name their transformer layers
      (``shard_units()``), FSDP's and compile's units (:mod:`vidray.train.parallel`).
    - ``collate(rows) -> batch``: CPU tensors from the dataset's rows.
    - ``training_step(batch) -> (loss, logs)``, the batch on the model's device.
    - optional ``prepare(batch) -> batch``: CPU-side randomness (masks, pairings) on the collated
      batch before the copy to the device, drawn from the system's ``generator`` (checkpointed), so
      the same seed gives the same run on any device.
    - ``validation_step(batch, generator) -> logs``: when ``train.val_every`` > 0.
    """

    model: torch.nn.Module

    def collate(self, rows: list[dict]) -> dict: ...

    def training_step(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]: ...


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker. ``config`` holds the typed config (``cfg_obj``), the
    ``build_system(cfg, device)`` function, ``make_tracker()`` (rank 0's MLflow run) and
    ``progress`` (the driver's progress board, or None)."""
    import ray.train

    cfg, build_system = config["cfg_obj"], config["build_system"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(cfg.train.seed + rank)
    device = torch.device("cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu")
    system = build_system(cfg, device)
    # A system's own CPU generator (masks, pairings): one stream per rank, so workers do not draw
    # the same masks for their different batches; checkpointed with the other RNGs.
    generator = getattr(system, "generator", None)
    if generator is not None and rank > 0:
        generator.manual_seed(_stream_seed(cfg.train.seed, rank))
    model = system.model = parallelize(system.model, cfg.train.strategy, world, device)
    if cfg.train.compile:
        compiled = compile_layers(model)
        if rank == 0:
            note(f"torch.compile: {compiled} transformer layers, compiled during the first steps")
    # One fused CUDA kernel for the whole update on GPU (DDP replicas hold plain tensors; FSDP's
    # sharded parameters keep the default path). None, not False: False also turns off foreach.
    fused = device.type == "cuda" and cfg.train.strategy == "ddp"
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr,
                                 betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay,
                                 fused=fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_poly_decay(cfg.optim.warmup_steps, cfg.train.steps))
    step, position = 0, (0, 0)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = load_checkpoint(directory)
        load_full_state(model, optimizer, state["model"], state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        position = (state.get("epoch", 0), state.get("epoch_batches", 0))
        # The saved RNGs are rank 0's; the other ranks start streams of their own at this step.
        if rank == 0:
            set_rng_state(state["rng"], generator)
        else:
            torch.manual_seed(_stream_seed(cfg.train.seed, rank, step))
            if generator is not None:
                generator.manual_seed(_stream_seed(cfg.train.seed, rank, step, 1))
    nodes = worker_nodes(world)
    tracker = config["make_tracker"]() if rank == 0 else None
    if tracker:  # set at every (re)start: after a lost node, where the run went on
        tracker.set_tag("ray.worker_nodes", ",".join(nodes))
        if len(set(nodes)) > 1:
            placed = ", ".join(f"rank {i} on {node[:8]}" for i, node in enumerate(nodes))
            note(f"workers on {len(set(nodes))} nodes: {placed}")
    board = config.get("progress") if rank == 0 else None
    try:
        _train(cfg, system, model, optimizer, scheduler, step, position, tracker, board, rank, world, device)
    except BaseException:
        if tracker:
            tracker.finish("FAILED")
        raise
    if tracker:
        tracker.finish()


def worker_nodes(world: int) -> list[str]:
    """The Ray node id of every rank, in rank order (all ranks call it: a collective)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    if world == 1:
        return [node]
    nodes: list = [None] * world
    torch.distributed.all_gather_object(nodes, node)
    return nodes


def _stream_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _train(cfg, system, model, optimizer, scheduler, step, position, tracker, board, rank, world, device) -> None:
    """Train from ``step``; ``position`` is (epoch, micro-batches of it already trained on): a
    resumed run skips those, so it sees the batches an uninterrupted run would have. Rank 0 logs
    each step to ``tracker`` (MLflow) and posts it to ``board`` (the driver's progress line)."""
    import ray.train

    from torch.utils.flop_counter import FlopCounterMode

    shard = ray.train.get_dataset_shard("train")
    per_worker = max(1, cfg.train.batch_size // (world * cfg.train.grad_accum))
    use_bf16 = device.type == "cuda" and cfg.train.precision == "bf16"
    peak = peak_tflops(torch.cuda.get_device_name(device)) if use_bf16 else None
    started, examples, micro = time.monotonic(), 0, 0
    flops_per_example = None  # counted on the first micro-batch (forward + backward), as it runs
    if rank == 0:
        note(f"training from step {step} to {cfg.train.steps} on {world} worker(s)")
    # A system's CPU-side randomness (masks, pairings) runs before the copy, so a batch crosses
    # to the GPU once and is never copied back.
    prepare = getattr(system, "prepare", lambda batch: batch)
    epoch, done = position
    while step < cfg.train.steps:
        # Pinned host memory and two batches in flight: the copy to the GPU overlaps the step.
        batches = shard.iter_torch_batches(batch_size=per_worker, collate_fn=batch_collate(system), drop_last=True,
                                           pin_memory=device.type == "cuda", prefetch_batches=2,
                                           **shuffle_options(cfg.train, rank, epoch))
        in_epoch = 0
        for in_epoch, batch in enumerate(batches, start=1):
            if in_epoch <= done:  # trained on before the checkpoint this run resumed from
                continue
            batch = to_device(prepare(batch), device)
            counter = FlopCounterMode(display=False) if flops_per_example is None else nullcontext()
            with counter:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    loss, logs = system.training_step(batch)
                (loss / cfg.train.grad_accum).backward()
            if flops_per_example is None:
                flops_per_example = counter.get_total_flops() / per_worker
            micro += 1
            examples += per_worker * world
            if micro % cfg.train.grad_accum:
                continue
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            elapsed = time.monotonic() - started
            rate = examples / elapsed if elapsed else 0.0
            # Model FLOPs per second per worker (training FLOPs of the model, not of recomputation).
            tflops = rate / world * flops_per_example / 1e12
            grad_norm = local_value(grad_norm)  # before clipping; the step used at most optim.grad_clip
            metrics = {"loss": loss.item(), "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                       "grad_norm_clipped": min(grad_norm, cfg.optim.grad_clip),
                       "examples_per_s": rate, "tflops_per_worker": tflops,
                       **({"mfu": tflops / peak} if peak else {}),
                       **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
            if board is not None:  # fire and forget: the driver reads the latest once a second
                board.post.remote({"step": step, "loss": metrics["loss"], "examples_per_s": rate})
            if tracker:
                tracker.log(metrics, step)
                if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                    log(f"step {step}/{cfg.train.steps} loss {metrics['loss']:.4f} "
                        f"lr {metrics['lr']:.2e} {metrics['examples_per_s']:.1f} examples/s"
                        + (f" MFU {metrics['mfu']:.1%}" if peak else ""))
            last = step == cfg.train.steps
            validate_now = cfg.train.val_every and (step % cfg.train.val_every == 0 or last)
            if validate_now:
                metrics.update(_validate(system, model, per_worker, world, cfg.train.seed, device))
                if tracker:
                    tracker.log({k: v for k, v in metrics.items() if k.startswith("val_")}, step)
            if step % cfg.train.checkpoint_every == 0 or last:
                _report(cfg, model, optimizer, scheduler, step, metrics, rank, with_checkpoint=True,
                        position={"epoch": epoch, "epoch_batches": in_epoch},
                        rng=rng_state(getattr(system, "generator", None)))
            elif validate_now:  # a result without a checkpoint: Tune's schedulers act on it
                _report(cfg, model, optimizer, scheduler, step, metrics, rank, with_checkpoint=False)
            if step >= cfg.train.steps:
                return
        if in_epoch == 0:
            raise RuntimeError(f"worker {rank}'s share of the training data holds no full batch of "
                               f"{per_worker} rows in epoch {epoch}: lower train.batch_size or add data")
        epoch, done = epoch + 1, 0


def batch_collate(system):
    """The system's collate (numpy columns -> tensors) as the callable class Ray Data takes: a plain
    function passed to ``iter_torch_batches`` is deprecated since Ray 2.47 and warns every epoch."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class SystemCollate(NumpyBatchCollateFn):
        def __call__(self, batch):
            return system.collate(batch)

    return SystemCollate()


def shuffle_options(train, rank: int, epoch: int) -> dict:
    """Ray Data's local shuffle for one epoch of one worker. Unshuffled, rows come in dataset order:
    a video's clips side by side, so in-batch negatives (contrastive, matching) would mostly be
    other clips of the text's own video, and every epoch would repeat the same batches. The seed
    follows (seed, rank, epoch): a new order every epoch, the same order when a resumed run
    replays the epoch it stopped in. (Which rows reach which worker is Ray Data's streaming
    split, not seeded: with several workers a resumed epoch holds the same rows only where the
    split repeats.)"""
    if not train.shuffle_buffer:
        return {}
    seed = int(np.random.SeedSequence([train.seed, rank, epoch]).generate_state(1)[0])
    return {"local_shuffle_buffer_size": train.shuffle_buffer, "local_shuffle_seed": seed}


def to_device(batch: dict, device) -> dict:
    """Every tensor of ``batch`` (or object with ``.to``, e.g. a masked batch) on ``device``."""
    return {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}


def _validate(system, model, per_worker: int, world: int, seed: int, device) -> dict[str, float]:
    """``val_<name>``: the system's ``validation_step`` metrics averaged over every held-out
    example on every worker. Masks come from a generator reseeded per pass, so two passes (and
    two trials of a sweep) score the same examples the same way."""
    import ray.train

    shard = ray.train.get_dataset_shard("val")
    generator = torch.Generator().manual_seed(seed)
    sums: dict[str, float] = {}
    count = 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=per_worker, collate_fn=batch_collate(system)):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            n = len(next(v for v in batch.values() if torch.is_tensor(v)))
            for name, value in system.validation_step(batch, generator).items():
                sums[name] = sums.get(name, 0.0) + float(value) * n
            count += n
    model.train(was_training)
    names = sorted(sums)
    totals = torch.tensor([sums[k] for k in names] + [float(count)], dtype=torch.float64, device=device)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(totals)
    if totals[-1] == 0:
        return {}
    return {f"val_{k}": (totals[i] / totals[-1]).item() for i, k in enumerate(names)}


def _report(cfg, model, optimizer, scheduler, step, metrics, rank, with_checkpoint: bool,
            position: dict | None = None, rng: dict | None = None) -> None:
    """Report ``metrics`` to Ray Train, with a checkpoint when ``with_checkpoint`` that also holds
    ``position`` (where in the data the run stands) and ``rng`` (its RNG streams)."""

    import ray.train

    if not with_checkpoint:
        ray.train.report({**metrics, "step": step})
        return
    model_state, optimizer_state = full_state(model, optimizer)  # every rank: collective under FSDP
    with tempfile.TemporaryDirectory() as directory:
        if rank == 0:  # the states are whole on rank 0: one copy is enough
            save_checkpoint(directory, model_state, optimizer_state, scheduler, step, dataclasses.asdict(cfg),
                            extra=position, rng=rng)
        checkpoint = ray.train.Checkpoint.from_directory(directory) if rank == 0 else None
        ray.train.report({**metrics, "step": step}, checkpoint=checkpoint,
                         checkpoint_dir_name=f"checkpoint_{step:08d}")


def fit(cfg: Any, build_system: Callable[[Any, torch.device], System], dataset, make_tracker: Callable, run_name: str,
        storage_path: str, val_dataset=None, callbacks: tuple = (), progress=None) -> Any:
    """Build the TorchTrainer and run it; returns Ray Train's Result. ``val_dataset`` is scored
    every ``train.val_every`` steps; ``callbacks`` are Ray Train callbacks (a sweep passes
    Tune's ``TuneReportCallback``); ``progress``: a progress board for rank 0 to post to."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer


    filesystem, path = (storage.arrow_filesystem(storage_path) if storage.is_remote(storage_path)
                        else (None, os.path.abspath(storage_path)))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg_obj": cfg, "build_system": build_system, "make_tracker": make_tracker,
                           "progress": progress},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     placement_strategy=cfg.train.placement),
        run_config=RunConfig(name=run_name, storage_path=path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             callbacks=list(callbacks)),
        datasets={"train": dataset, **({"val": val_dataset} if val_dataset is not None else {})},
    )
    return trainer.fit()
