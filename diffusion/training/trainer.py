"""The training loop, shared by every task: accelerate, AdamW with warm-up, EMA, checkpoints.

Follows diffusers' train_unconditional.py: one Accelerator drives CPU, one GPU or many GPUs
(`accelerate launch train.py ...`), with mixed precision and gradient accumulation from config.
"""
from __future__ import annotations

import shutil
import signal
import sys
import time
from pathlib import Path
from typing import ContextManager

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ..checkpoints import store as ckpt
from ..checkpoints.ema_state import save_ema_state
from ..checkpoints.init_from import initialise_from
from ..checkpoints.resume import load_training_state
from ..checkpoints.run_folder import move_aside
from ..checkpoints.run_lock import RunLock
from ..conditioning.upsample import with_low_res
from ..config import Config, save_config
from ..data import build_dataloader, build_dataset, pins_memory
from ..device import compile_model, use_fast_cuda_math
from ..errors import Diverged, Interrupted, UserError, first_line, one_line
from ..io import write_failures
from ..memory import check_training_memory
from ..signals import blocked_stop_signals
from ..threads import cpu_threads_note
from .batches import training_augment, training_collate
from .guard import LossGuard
from . import phema
from .logger import MetricLogger
from .preflight import preflight
from .stop import StopRequest
from .tasks import Task, build_task


def resolve_dataset_info(cfg: Config, dataset) -> list[str]:
    """Fill `model.num_classes` from the dataset (0 = automatic) and return class names."""
    names = list(getattr(dataset, "class_names", []))
    if cfg.model.num_classes == 0:
        cfg.model.num_classes = dataset.num_classes
    elif cfg.model.num_classes < dataset.num_classes:
        raise UserError(f"model.num_classes={cfg.model.num_classes} but the dataset has {dataset.num_classes} classes")
    return names


def warmup_lr(cfg: Config, step: int) -> float:
    return cfg.train.lr * min(1.0, (step + 1) / max(1, cfg.train.warmup_steps))


class Trainer:
    def __init__(self, cfg: Config, resume: str | None = None, log: bool = True, on_step=None, overwrite: bool = False):
        """`on_step(trainer, loss)`, if given, runs after every optimizer step (e.g. scaling-law evaluations).
        `overwrite`: start afresh in an output_dir that holds a run, after moving that run aside."""
        self.cfg = cfg
        self.on_step = on_step
        self.run_dir = Path(cfg.output_dir)
        self.resume_from = preflight(cfg, resume, overwrite)
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),  # on CPU, torchrun still runs it multi-process (gloo)
            mixed_precision=cfg.train.mixed_precision,
            gradient_accumulation_steps=cfg.train.grad_accum,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=pins_memory(cfg.data)),
            dynamo_backend="no",  # compiled below from train.compile: accelerate's setting is process-wide
        )
        self.run_lock = RunLock(self.run_dir) if self.accelerator.is_main_process else None  # one run per folder
        if self.run_lock is not None:
            with self.write_guard(f"output_dir {self.run_dir}"):
                if overwrite:
                    self.move_old_run_aside()
                ckpt.remove_crash_residue(self.run_dir)  # .tmp-* folders of a killed save; safe under the lock
        self.accelerator.wait_for_everyone()
        set_seed(cfg.train.seed, device_specific=True)
        use_fast_cuda_math(self.accelerator.device, cfg.train.allow_tf32)
        dataset = with_low_res(build_dataset(cfg.data), cfg)  # upsamplers: items carry their low-res input
        self.state = ckpt.TrainState(class_names=resolve_dataset_info(cfg, dataset))
        per_device_batch = cfg.train.batch_size // self.accelerator.num_processes
        check_training_memory(cfg, self.accelerator.device, max(1, per_device_batch))  # before allocating anything
        self.task: Task = build_task(cfg)
        model = self.task.build_model()
        if cfg.init_from and self.resume_from is None:
            initialise_from(model, cfg.init_from, cfg)
        if self.accelerator.device.type == "cuda" and cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if per_device_batch * self.accelerator.num_processes != cfg.train.batch_size:
            raise UserError(f"train.batch_size={cfg.train.batch_size} is not divisible by {self.accelerator.num_processes} processes")
        if len(dataset) < per_device_batch:
            raise UserError(f"the dataset has {len(dataset)} images, fewer than one batch of {per_device_batch}")
        loader = build_dataloader(dataset, cfg.data, per_device_batch, seed=cfg.train.seed,
                                  augment=training_augment(cfg), collate_fn=training_collate(cfg))
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
            fused=self.accelerator.device.type == "cuda",
        )
        self.ema = EMAModel(
            model.parameters(), decay=cfg.train.ema_decay, use_ema_warmup=cfg.train.ema_warmup,
            power=cfg.train.ema_power, foreach=True,
        )
        self.model, self.optimizer, self.loader = self.accelerator.prepare(model, optimizer, loader)
        if cfg.train.compile:  # last, around any DDP wrapper, as accelerate does
            self.model = compile_model(self.model, cfg.train.compile_backend)
        self.ema.to(self.accelerator.device)  # saved as safetensors + JSON, not registered (see checkpoints.ema_state)
        self.phema: phema.PowerEMA | None = None  # post-hoc EMA profiles: tracked and written by the main process
        if cfg.train.posthoc_ema and self.accelerator.is_main_process:
            self.phema = phema.PowerEMA(list(self.core.parameters()), cfg.train.posthoc_ema_sigma_rels)
        self.log_metrics = log

    @property
    def core(self) -> torch.nn.Module:
        """The bare model: no DDP wrapper and no torch.compile wrapper (whose names carry `_orig_mod.`)."""
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    # -- checkpoints -------------------------------------------------------------------------

    def write_guard(self, what: str, partial: Path | None = None) -> ContextManager[None]:
        """A full disk (or quota, read-only file system) while writing `what` ends the run in one line
        (exit 2) naming the newest complete checkpoint, which is kept; `partial`, the half-written
        folder, is deleted first (the main process writes it)."""
        def cleanup() -> None:
            if partial is not None and self.accelerator.is_main_process:
                shutil.rmtree(partial, ignore_errors=True)

        def fix() -> str:
            saved = ckpt.list_checkpoints(self.run_dir)
            kept = f"the newest complete checkpoint, {saved[-1]}, is kept" if saved else "no checkpoint was saved yet"
            return f"free space there, then continue with --resume auto ({kept})"
        return write_failures(what, self.run_dir, fix, cleanup)

    def check_finite(self, what: str) -> None:
        """Refuse to save or export weights with a NaN or inf (so the last finite checkpoint is kept)."""
        profiles = [t for shadows in (self.phema.shadows if self.phema else []) for t in shadows]
        params = [*self.core.parameters(), *self.ema.shadow_params, *profiles]
        if not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            raise Diverged(f"the weights are not finite at step {self.state.step}: training diverged, so no {what} "
                           "was written; lower train.lr or set train.grad_clip, and resume from the last checkpoint")

    def save_checkpoint(self) -> Path:
        self.check_finite("checkpoint")
        final = ckpt.checkpoint_root(self.run_dir) / f"step-{self.state.step:06d}"
        tmp = final.with_name(f".tmp-{final.name}")
        with self.write_guard(f"checkpoint {final}", partial=tmp):
            self.accelerator.save_state(str(tmp / "accelerate"))
            self.accelerator.wait_for_everyone()  # every process's RNG state is in tmp before it moves
            if self.accelerator.is_main_process:
                ckpt.write_weights(tmp / ckpt.EMA_FILE, ckpt.named_weights(self.core, self.ema.shadow_params))
                save_ema_state(tmp, self.ema)
                if self.phema is not None:
                    phema.save_state(tmp, self.phema, self.parameter_names())
                ckpt.finish_checkpoint(tmp, final, self.cfg, self.state, self.cfg.train.keep_checkpoints)
        self.accelerator.wait_for_everyone()
        return final

    def load_checkpoint(self, path: Path) -> None:
        """Model, optimizer, RNG and EMA state (checked, no code-running pickles) and the data position."""
        saved = load_training_state(path, self.accelerator, self.ema, self.core)
        per_epoch = len(self.loader)
        if saved.step * self.cfg.train.grad_accum != saved.epoch * per_epoch + saved.batch_in_epoch:
            raise UserError(f"cannot resume from {path}: its {ckpt.INFO_FILE} says step {saved.step} but data position "
                            f"epoch {saved.epoch}, batch {saved.batch_in_epoch} (at {per_epoch} batches an epoch): "
                            "info.json was edited, or the dataset changed size since the save")
        self.state.step, self.state.epoch, self.state.batch_in_epoch = saved.step, saved.epoch, saved.batch_in_epoch
        if self.phema is not None:
            phema.load_state(path, self.phema, self.parameter_names(), saved.step)

    def parameter_names(self) -> list[str]:
        return [name for name, _ in self.core.named_parameters()]

    def start_posthoc_ema(self) -> None:
        """Main process: say what the snapshots cost on disk, and delete the snapshots a killed run wrote
        after the step this run starts from (it writes them again, bit for bit, from the same weights)."""
        train = self.cfg.train
        print(phema.disk_note(list(self.core.parameters()), self.phema.sigma_rels, train.posthoc_ema_every,
                              train.max_steps, train.posthoc_ema_fp16, self.run_dir), flush=True)
        removed = phema.remove_snapshots_after(self.run_dir, self.state.step)
        if removed:
            print(f"post-hoc EMA: removed the {len(removed)} snapshots after step {self.state.step} (steps "
                  f"{removed[0]}-{removed[-1]}) that a stopped run wrote; they are written again", flush=True)

    def write_snapshot(self) -> Path:
        """RUN/posthoc/snapshots/step-N/ (main process), before this step's checkpoint: a kill between
        the two leaves a snapshot newer than the newest checkpoint, which the resume removes."""
        self.check_finite("post-hoc EMA snapshot")
        final = phema.snapshot_root(self.run_dir) / f"step-{self.state.step:06d}"
        with self.write_guard(f"post-hoc EMA snapshot {final}", partial=final.with_name(f".tmp-{final.name}")):
            return phema.write_snapshot(self.run_dir, self.phema, self.core, self.cfg.train.posthoc_ema_fp16,
                                        {"class_names": self.state.class_names}, self.accelerator.process_index)

    def move_old_run_aside(self) -> None:
        """--overwrite: rename the run in output_dir aside whole, under its lock, and lock the new folder."""
        old_lock = self.run_lock
        aside = move_aside(self.run_dir)
        if aside is not None:
            self.run_lock = RunLock(self.run_dir)
            old_lock.release()
            print(f"--overwrite: moved the run that was in {self.run_dir} to {aside}")

    def stop_workers(self, batches) -> None:
        """Shut the data-loader workers down now, whatever ended the loop. They ignore SIGTERM (see
        diffusion.signals), so leaving them to the interpreter's exit, which terminates leftover workers
        with SIGTERM and then joins them, would wait forever after an error."""
        batches.close()  # ends a resumed run's partial-epoch loader, if one is running
        iterator = getattr(self.loader, "_iterator", None)  # persistent workers: the loader keeps its iterator
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
            self.loader._iterator = None

    def release_run(self) -> None:
        """Let another process train in this run folder (a process exit releases it too)."""
        if self.run_lock is not None:
            self.run_lock.release()

    def with_ema_weights(self, fn) -> None:
        """Run `fn(core)` with the EMA weights swapped in."""
        params = list(self.core.parameters())
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            fn(self.core)
        finally:
            self.ema.restore(params)

    # -- the loop ----------------------------------------------------------------------------

    def batches(self):
        """Endless (epoch, batch) stream that starts at the saved data position."""
        while True:
            self.loader.set_epoch(self.state.epoch)
            loader = self.loader
            if self.state.batch_in_epoch:
                loader = self.accelerator.skip_first_batches(self.loader, self.state.batch_in_epoch)
            for batch in loader:
                self.state.batch_in_epoch += 1
                yield batch
            self.state.epoch += 1
            self.state.batch_in_epoch = 0

    def train_step(self, batch: dict) -> torch.Tensor | None:
        """One micro-batch; returns the loss, and steps the optimizer when gradients sync."""
        with self.accelerator.accumulate(self.model):
            with self.accelerator.autocast():
                loss, metrics = self.task.loss(self.model, self.core, batch)
            self.accelerator.backward(loss)
            if self.accelerator.sync_gradients and self.cfg.train.grad_clip > 0:
                self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
            for group in self.optimizer.param_groups:
                group["lr"] = warmup_lr(self.cfg, self.state.step)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def fit(self) -> Path:
        """Train to train.max_steps (or a stop signal); a full disk anywhere is one line (write_guard)."""
        with self.write_guard(f"the run's files in {self.run_dir}"):
            return self._fit()

    def _fit(self) -> Path:
        cfg, acc = self.cfg, self.accelerator
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / ckpt.CONFIG_FILE)
        acc.print(f"training on {acc.device}" + (f" with {cpu_threads_note()}" if acc.device.type == "cpu" else ""))
        if self.resume_from is not None:
            self.load_checkpoint(self.resume_from)
            acc.print(f"resumed from {self.resume_from} at step {self.state.step}")
        if self.phema is not None:
            self.start_posthoc_ema()
        self.logger = MetricLogger(self.run_dir, enabled=self.log_metrics and acc.is_main_process, start_step=self.state.step)
        stop = StopRequest()
        bar = tqdm(total=cfg.train.max_steps, initial=self.state.step, desc="training", disable=not acc.is_main_process)
        images_per_step = cfg.train.batch_size * cfg.train.grad_accum
        loss_sum, loss_count, tick, tick_step = torch.zeros((), device=acc.device), 0, time.perf_counter(), self.state.step
        last_saved = self.state.step if self.resume_from else -1
        saved = self.resume_from
        guard = LossGuard(cfg, saved, self.state.step)
        batches = self.batches()
        try:
            while self.state.step < cfg.train.max_steps:
                with blocked_stop_signals():  # workers forked here must not die of a signal first
                    batch = next(batches)
                loss = self.train_step(batch)
                loss_sum += loss
                loss_count += 1
                if not acc.sync_gradients:
                    continue
                self.ema.step(self.core.parameters())
                self.state.step += 1
                bar.update(1)
                step = self.state.step
                if self.phema is not None:
                    self.phema.update(list(self.core.parameters()), step)
                if self.on_step is not None:
                    self.on_step(self, loss)
                if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                    elapsed = time.perf_counter() - tick
                    mean_loss = (acc.gather(loss_sum).sum() / (loss_count * acc.num_processes)).item()
                    metrics = {"loss": mean_loss, "lr": self.optimizer.param_groups[0]["lr"],
                               "images_per_sec": images_per_step * (step - tick_step) / elapsed}
                    self.logger.log(step, metrics)
                    guard.check(step, mean_loss, step - tick_step)  # the same value on every rank
                    bar.set_postfix(loss=f"{mean_loss:.4f}")
                    loss_sum.zero_()
                    loss_count, tick, tick_step = 0, time.perf_counter(), step
                if self.phema is not None and (step % cfg.train.posthoc_ema_every == 0 or step == cfg.train.max_steps):
                    self.write_snapshot()  # before the checkpoint of the same step (see write_snapshot)
                if step % cfg.train.checkpoint_every == 0:  # before the preview: a failing preview costs nothing
                    saved = self.save_checkpoint()
                    last_saved = step
                    guard.saved(saved, step)
                if cfg.train.sample_every and step % cfg.train.sample_every == 0 and acc.is_main_process:
                    self.preview(step)
                if stop.agreed(acc):  # only here, after a real optimizer step, and on every rank at once
                    break
            if last_saved != self.state.step:
                saved = self.save_checkpoint()
            if self.state.step >= cfg.train.max_steps and acc.is_main_process:
                self.export()
        finally:  # a signal during the saves above still lets them finish
            bar.close()
            stop.restore()
            self.stop_workers(batches)
            self.release_run()
        self.logger.close()
        if stop.signum is not None:
            name = signal.Signals(stop.signum).name
            acc.print(f"interrupted by {name} at step {self.state.step}: saved {saved}; continue with --resume auto")
            raise Interrupted(f"interrupted by {name}", stop.signum)
        return self.run_dir

    def preview(self, step: int) -> None:
        """The task's preview (a sample grid) with the EMA weights. It cannot stop training: a failure
        is one warning line, and the run goes on (its checkpoint at this step is already saved)."""
        try:
            self.with_ema_weights(lambda core: self.task.preview(core, step, self.run_dir))
        except Exception as err:  # noqa: BLE001 - a preview is a convenience, the run is what matters
            message = one_line(err) if isinstance(err, UserError) else f"{type(err).__name__}: {first_line(err)}"
            tqdm.write(f"warning: the preview at step {step} failed ({message}); training goes on", file=sys.stderr)

    def export(self) -> None:
        """Final EMA model, as a checkpoint sample.py reads and in plain-diffusers format."""
        self.check_finite("final model")
        final = self.run_dir / "final"
        tmp = final.with_name(".tmp-final")
        with self.write_guard(f"the final model {final}", partial=tmp):
            tmp.mkdir(parents=True, exist_ok=True)
            ckpt.write_weights(tmp / ckpt.EMA_FILE, ckpt.named_weights(self.core, self.ema.shadow_params))
            self.with_ema_weights(lambda core: self.task.export(core, tmp))
            ckpt.finish_checkpoint(tmp, final, self.cfg, self.state, keep=0)


def train(cfg: Config, resume: str | None = None, overwrite: bool = False) -> Path:
    trainer = Trainer(cfg, resume, overwrite=overwrite)
    try:
        run_dir = trainer.fit()
    finally:  # destroy the process group (multi-process runs) before exit: left to the interpreter's
        trainer.accelerator.end_training()  # teardown, gloo's threads can abort a finished rank
    trainer.accelerator.print(f"run saved in {run_dir}")
    return run_dir
