"""The stage-3 training loop: a noise model (NoiseSequenceRNN_v3, or with --model_type the one-step baselines
DirectNoiseModel and NPNet) on a golden-noise sequence dataset, with accelerate (1..N
processes, CPU too). `Trainer(config, arch).run()` builds, resumes, trains, validates, checkpoints and exports;
tests call it in process, and src/train_rnn_model_v3.py only turns flags into its two dataclasses.

Exact resume: the data order depends only on (seed, epoch); a checkpoint holds the model, optimizer, scheduler
and every process's random states, taken after that step's validation; and no DataLoader draws from the global
random generator (which drives dropout) at a point that depends on the process's history: the training loader
has its own generator, and the validation loader makes a new iterator (and draws its one number) at every
validation, so a resumed run draws exactly what an uninterrupted one does.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..dataset import format as dataset_format
from ..dataset.reader import as_float, collate, dataset_fingerprint, golden_change_rms, open_dataset
from ..errors import UserError, one_line
from ..io import atomic_write_json
from ..model import is_one_step, model_class
from ..model.rnn_seq_model_v3 import FINAL_STEM, NoiseSequenceRNNConfig
from ..runs import RunLock, check_writable_dir, refuse_other_settings
from ..runtime import get_logger, on_main, setup_logging
from . import checkpoints as C
from . import core as T
from .config import TrainingConfig, architecture, resume_keys
from ..export import push_export
from ..hub import check_can_push

logger = get_logger("train_rnn_model_v3")


LOSS_TERMS = ("loss", "recon", "mse", "kl")


@dataclass
class LossWindow:
    """The training losses since the last log line: sums of the per-process means of each term, micro-batches,
    samples, and when the window opened."""

    sums: dict[str, float] = field(default_factory=dict)
    micro_batches: int = 0
    samples: int = 0
    opened: float = field(default_factory=time.perf_counter)

    def add(self, terms: torch.Tensor, samples: int) -> None:
        """terms: (P, 4) every process's loss, recon, mse, kl of one micro-batch; samples: valid ones, all processes."""
        for k, v in zip(LOSS_TERMS, terms.mean(dim=0).tolist()):
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.micro_batches += 1
        self.samples += samples

    def means(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self.opened
        return {**{f"train/{k}": v / self.micro_batches for k, v in self.sums.items()},
                "train/samples_per_s": self.samples / max(elapsed, 1e-9)}


class Trainer:
    """Train NoiseSequenceRNN_v3: `build` (accelerator, output-dir lock, verified data and checkpoint, model,
    loaders), `resume`, `run` (`train`: the loop, with `validate` and `save`; then `export` and `push` to the hub),
    `close`."""

    def __init__(self, config: TrainingConfig, arch=None):
        self.config = config.check()  # the same rules as the flags, for a config built in code
        self.arch = arch if arch is not None else architecture(config.model_type)  # the model type's config
        wanted = model_class(config.model_type).config_class
        if type(self.arch) is not wanted:
            raise UserError(f"--model_type {config.model_type} takes a {wanted.__name__}, got a "
                            f"{type(self.arch).__name__}")
        self.one_step = is_one_step(config.model_type)  # x_T -> x'_n in one forward (DirectNoiseModel, NPNet)
        self.output_dir = Path(config.output_dir)
        # build(): the accelerator, the output dir's lock (held until close), the checkpoint to resume, the data
        self.accelerator = None
        self.lock: RunLock | None = None
        self.resume_dir: Path | None = None
        self.data = None  # dataset.reader's opened dataset: train and validation splits, run_config
        # build(): the model and what trains it (prepared by accelerate), and the run's length
        self.model_config = None  # the arch with the data's shapes (and delta_scale), or a checkpoint's
        self.model = self.optimizer = self.lr_scheduler = None
        self.sampler: T.EpochSampler | None = None  # the training data order: a function of (seed, epoch)
        self.train_loader = self.val_loader = None
        self.updates_per_epoch = self.num_epochs = self.total_steps = self.warmup = 0
        self.n_params = 0
        # where the run stands (resume() sets the first three from a checkpoint)
        self.global_step = self.first_epoch = self.skip_batches = 0
        self.last_checkpoint: Path | None = None
        self.bad_ids: set[int] = set()  # samples skipped with --skip_bad_samples
        self.window = LossWindow()  # the losses of the next log line
        self.grad_norm = torch.tensor(0.0)  # of the last optimizer step
        self.bar = None  # the progress bar while training
        self.export_paths: tuple[Path, Path] | None = None  # (weights, config) once exported, main process

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def delta_scale(self) -> float | None:
        """The model's change scale (the golden change's RMS); None for NPNet, which has none."""
        return getattr(self.model_config, "delta_scale", None)

    # ---- run: the whole job, and its loop on one screen ---------------------------------------------------
    def run(self) -> dict:
        """Build (unless built), resume, train, validate and export; returns the validation.json summary."""
        from accelerate.utils import gather_object

        try:
            if self.accelerator is None:
                self.build()
            self.resume()
            self._log_start()
            self.train()
            acc = self.accelerator
            acc.wait_for_everyone()
            self.bad_ids = set().union(*gather_object([self.bad_ids]))
            summary = self.export(self.validate())
            if self.config.push_to_hub:
                on_main(acc, self.push)
            # leave together, after releasing the prepared objects (close() stops the loaders' worker processes)
            acc.wait_for_everyone()
            return summary
        finally:
            self.close()

    def train(self) -> None:
        """The loop: micro-batches of each epoch (the rest of it when resuming); after each optimizer step the
        losses are logged, the model validated and a checkpoint saved (after the validation, so it holds the
        random state the next step starts from), each every N steps."""
        acc, cfg = self.accelerator, self.config
        self.model.train()
        self.window = LossWindow()
        with self._progress_bar():
            for epoch in range(self.first_epoch, self.num_epochs):
                if self.global_step >= self.total_steps:
                    break
                for batch in self._epoch_batches(epoch):
                    losses = self._micro_step(batch)  # forward, loss, backward; an optimizer step when in sync
                    self.window.add(losses, int(acc.gather(batch["valid"].sum()[None]).sum()))
                    if not acc.sync_gradients:
                        continue
                    self.lr_scheduler.step()
                    self.global_step += 1
                    step = self.global_step
                    self.bar.update(1)
                    if step % cfg.logging_steps == 0 or step == self.total_steps:
                        self._log_losses(epoch)
                    if cfg.validation_steps and step % cfg.validation_steps == 0 and step < self.total_steps:
                        self.validate()
                        self.model.train()
                    if step % cfg.save_steps == 0:
                        self.last_checkpoint = self.save(step)
                    if step >= self.total_steps:
                        return

    # ---- build ---------------------------------------------------------------------------------------------
    def build(self) -> "Trainer":
        """Everything before the first step; every check that can fail runs before any heavy work."""
        from accelerate.utils import set_seed

        if self.config.push_to_hub:  # a push that cannot happen fails now, not after the training

            check_can_push(self.config.push_to_hub, "--push_to_hub", self.config.hub_token)
        self._start_accelerator()
        acc, cfg = self.accelerator, self.config
        on_main(acc, self._claim_output_dir)
        resume_dir = on_main(acc, self._find_resume)
        self.resume_dir = Path(resume_dir) if resume_dir is not None else None
        self.data = _open_data(cfg)
        self._note_compatibility_flags()
        self.model_config = self._model_config()
        set_seed(cfg.seed)  # the model's initial weights
        model = self._build_model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                      betas=(cfg.adam_beta1, cfg.adam_beta2))
        train_loader, val_loader = self._build_loaders()
        self.model, self.optimizer, self.train_loader = acc.prepare(model, optimizer, train_loader)
        self.val_loader = acc.prepare(val_loader) if val_loader is not None else None
        self._plan_steps()
        self.lr_scheduler = acc.prepare(T.warmup_cosine_schedule(self.optimizer, self.warmup, self.total_steps))
        set_seed(cfg.seed, device_specific=True)  # dropout differs per process; model init above did not
        return self

    def _start_accelerator(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        cfg, out = self.config, self.output_dir
        # mixed_precision None: accelerate's own choice (accelerate launch --mixed_precision / config, else "no")
        self.accelerator = Accelerator(
            gradient_accumulation_steps=cfg.gradient_accumulation_steps, mixed_precision=cfg.mixed_precision,
            log_with=None if cfg.report_to == "none" else cfg.report_to, step_scheduler_with_optimizer=False,
            project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")))
        setup_logging(self.is_main, quiet_diffusion_libraries=False)
        logging.getLogger("accelerate").setLevel(logging.WARNING)  # per-file checkpoint messages
        if self.accelerator.mixed_precision == "fp16" and self.accelerator.device.type == "cpu":
            logger.warning("--mixed_precision fp16 has no effect on CPU: training in float32")

    def _claim_output_dir(self) -> None:
        """A writable output dir that no other run holds (locked until `close`), without half-written checkpoints."""
        check_writable_dir(self.output_dir, "--output_dir")
        self.lock = RunLock(self.output_dir, "--output_dir").acquire()
        for stale in C.remove_stale_temp(self.output_dir):
            logger.info("removed %s, a checkpoint an interrupted run left half-written", stale)

    def _find_resume(self) -> str | None:
        """The verified checkpoint to resume (None: a new run), after refusing to mix runs in one output dir."""
        cfg = self.config
        resume_dir = C.find_resume_checkpoint(self.output_dir, cfg.resume_from_checkpoint, cfg.resume_fallback)
        self._refuse_mixing(resume_dir)
        if cfg.resume_from_checkpoint == "latest" and resume_dir is None:
            logger.info("--resume_from_checkpoint latest: no checkpoint in %s yet, starting a new run",
                        self.output_dir)
        if resume_dir is not None and cfg.resume_fallback:
            for moved in C.set_aside_newer(self.output_dir, C.checkpoint_step(resume_dir)):
                logger.warning("set the damaged checkpoint aside as %s", moved)
        return str(resume_dir) if resume_dir is not None else None

    def _refuse_mixing(self, resume_dir: Path | None) -> None:
        """Without a resume flag, an output dir holding an earlier training (checkpoints or an export) is refused,
        whatever its settings; resuming, a checkpoint (or, with none, the export) made with other byte-shaping
        settings (TrainingConfig's `rerun` fields, the architecture) is refused, naming each difference."""
        cfg, out = self.config, self.output_dir
        export = out / f"{FINAL_STEM}.json"
        if not cfg.resume_from_checkpoint:
            earlier = [p.name for p in C.list_checkpoints(out)] + ([export.name] if export.is_file() else [])
            if earlier:
                raise UserError(f"--output_dir {out} holds an earlier training ({', '.join(earlier)}): pass "
                                "--resume_from_checkpoint latest to continue it (with the same settings), or choose "
                                "a new --output_dir")
            return
        if resume_dir is not None:
            where, old = resume_dir, C.read_training_state(resume_dir).get("args") or {}
        elif export.is_file():
            where, old = export, C.read_export_args(export)
        else:
            return
        refuse_other_settings(where, old, cfg.record(self.arch), resume_keys(self.arch), "resume with the same "
                              "settings (only the run's length, checkpointing and logging may change), or choose a "
                              "new --output_dir", what="a training")

    def _note_compatibility_flags(self) -> None:
        """The seed's flags that this model does not use: said once, recorded only."""
        cfg, dataset_model = self.config, self.data.run_config.get("base_model_id")
        if cfg.base_model_id and cfg.base_model_id != dataset_model:
            logger.warning("--base_model_id %s differs from the dataset's %s: the dataset's is recorded",
                           cfg.base_model_id, dataset_model)
        if cfg.npnet_model_id:
            logger.info("--npnet_model_id %s is not used by the trainer (recorded only)", cfg.npnet_model_id)

    def _model_config(self):
        """Shapes from run_config.json, architecture from `arch`, delta_scale from the data (the RMS of the per-step
        change for the RNN, of the whole change x'_n - x_T for the direct model; NPNet has none) or, when resuming,
        the checkpoint's config, whose shapes the data must match."""
        cfg, data = self.config, self.data
        c, h, w = data.latent_shape
        path = Path(cfg.dataset_dir) / dataset_format.RUN_CONFIG
        if h != w:
            raise UserError(f"{path}: latent_shape {[c, h, w]} is not square; NoiseSequenceRNN_v3 needs H == W")
        if cfg.noise_resolution is not None and cfg.noise_resolution != h:
            raise UserError(f"--noise_resolution {cfg.noise_resolution} contradicts the dataset's latent_shape "
                            f"{[c, h, w]} ({path}): drop the flag or pass --noise_resolution {h}")
        if cfg.text_embed_dim is not None and cfg.text_embed_dim != data.text_dim:
            raise UserError(f"--text_embed_dim {cfg.text_embed_dim} contradicts the dataset's text_embedding.dim "
                            f"{data.text_dim} ({path}): drop the flag or pass --text_embed_dim {data.text_dim}")
        if self.resume_dir is not None:  # its architecture is the flags' (_refuse_mixing checked it)
            config = type(self.arch).from_dict(C.read_training_state(self.resume_dir)["model_config"])
            shape = (config.latent_channels, config.noise_resolution, config.text_embed_dim)
            if shape != (c, h, data.text_dim):
                raise UserError(f"{self.resume_dir} was trained on data of another shape ({list(shape)} as latent "
                                f"channels, resolution, text dim; the dataset's: {[c, h, data.text_dim]}): resume "
                                "with the original --dataset_dir or start a new --output_dir")
            return config
        values = dict(latent_channels=c, noise_resolution=h, text_embed_dim=data.text_dim)
        if isinstance(self.arch, NoiseSequenceRNNConfig):
            values["delta_scale"] = golden_change_rms(data.train, skip_bad_samples=cfg.skip_bad_samples,
                                                      total=self.one_step)
        try:
            return dataclasses.replace(self.arch, **values)
        except ValueError as e:
            raise UserError(f"invalid model flags: {e}") from None

    def _build_model(self) -> torch.nn.Module:
        """The model to train, from `model_config` (its initial weights draw from the seeded global generator)."""
        return model_class(self.config.model_type)(self.model_config)

    def _build_loaders(self):
        """(training loader, validation loader or None); the training order comes from `self.sampler`, and the
        training loader draws from its own generator (see the module docstring)."""
        from torch.utils.data import DataLoader

        cfg, acc = self.config, self.accelerator
        self.sampler = T.EpochSampler(len(self.data.train), cfg.seed)
        workers = cfg.dataloader_num_workers
        lock_fd = self.lock.fd if self.lock is not None else None
        loader_kw = dict(batch_size=cfg.batch_size, collate_fn=collate, num_workers=workers,
                         pin_memory=acc.device.type == "cuda",
                         worker_init_fn=functools.partial(_close_inherited_fd, lock_fd) if workers else None)
        train_loader = DataLoader(self.data.train, sampler=self.sampler, persistent_workers=workers > 0,
                                  generator=torch.Generator().manual_seed(cfg.seed), **loader_kw)
        # a new iterator per validation, never persistent: see the module docstring
        val_loader = DataLoader(self.data.validation, shuffle=False, **loader_kw) if len(self.data.validation) else None
        return train_loader, val_loader

    def _plan_steps(self) -> None:
        """The run's length: optimizer steps per epoch, epochs, total steps and warmup steps."""
        cfg = self.config
        self.updates_per_epoch = math.ceil(len(self.train_loader) / cfg.gradient_accumulation_steps)
        if cfg.max_train_steps:
            self.total_steps = cfg.max_train_steps
            self.num_epochs = math.ceil(self.total_steps / self.updates_per_epoch)
        else:
            self.num_epochs = cfg.num_epochs
            self.total_steps = self.num_epochs * self.updates_per_epoch
        self.warmup = cfg.lr_warmup_steps if cfg.lr_warmup_steps is not None else min(500, self.total_steps // 20)

    # ---- resume --------------------------------------------------------------------------------------------
    def resume(self) -> None:
        """Load the verified checkpoint (model, optimizer, scheduler, random states) and position the data."""
        if self.resume_dir is None:
            return
        acc, ckpt = self.accelerator, self.resume_dir
        acc.load_state(str(ckpt))
        self.global_step = C.checkpoint_step(ckpt)
        saved_procs = C.read_training_state(ckpt).get("num_processes")
        if saved_procs != acc.num_processes:
            logger.warning("%s was written by %s process(es), this run has %d: the data order and the random "
                           "states after resuming differ from an uninterrupted run", ckpt, saved_procs,
                           acc.num_processes)
        self.first_epoch, in_epoch = divmod(self.global_step, self.updates_per_epoch)
        self.skip_batches = in_epoch * self.config.gradient_accumulation_steps
        self.last_checkpoint = ckpt
        logger.info("Resumed from %s: step %d, epoch %d, skipping %d batches", ckpt, self.global_step,
                    self.first_epoch, self.skip_batches)

    # ---- the loop's parts ----------------------------------------------------------------------------------
    def _log_start(self) -> None:
        acc, cfg, data = self.accelerator, self.config, self.data
        self.n_params = sum(p.numel() for p in self.model.parameters())
        accum = cfg.gradient_accumulation_steps
        precision = acc.mixed_precision
        if precision == "fp16" and acc.device.type == "cpu":
            precision = "no (fp16 needs a GPU)"
        logger.info("***** Running training *****")
        logger.info("  num_processes=%d, device=%s, mixed_precision=%s", acc.num_processes, acc.device, precision)
        logger.info("  train samples=%d, validation samples=%d, missing files skipped=%d, damaged files skipped=%d, "
                    "steps per sequence=%d", len(data.train), len(data.validation), len(data.missing),
                    len(data.damaged), data.train.seq_len)
        logger.info("  model_type=%s, latent=%s, text dim=%d, parameters=%.2fM, golden change RMS (delta_scale)=%s",
                    cfg.model_type, list(data.latent_shape), data.text_dim, self.n_params / 1e6,
                    f"{self.delta_scale:.4g}" if self.delta_scale is not None else "none (NPNet)")
        logger.info("  batch/device=%d, accumulation=%d, effective batch=%d, epochs=%d, optimizer steps=%d, "
                    "warmup=%d", cfg.batch_size, accum, cfg.batch_size * accum * acc.num_processes, self.num_epochs,
                    self.total_steps, self.warmup)
        hparams = {**cfg.record(self.arch), "mixed_precision": acc.mixed_precision,
                   "num_processes": acc.num_processes, "delta_scale": self.delta_scale,
                   "train_samples": len(data.train), "validation_samples": len(data.validation)}
        acc.init_trackers("train_rnn_model_v3", config=T.flat_hparams(hparams))

    @contextmanager
    def _progress_bar(self):
        """A progress bar on the main process, shown on a terminal only (log lines go above it)."""
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self.bar = tqdm(total=self.total_steps, initial=self.global_step, desc="training", unit="step",
                        disable=None if self.is_main else True, dynamic_ncols=True)
        try:
            with logging_redirect_tqdm() if not self.bar.disable else nullcontext():
                yield self.bar
        finally:
            self.bar.close()

    def _epoch_batches(self, epoch: int):
        """The training loader for `epoch`, without the batches a resumed run already trained on."""
        loader = self.train_loader
        if epoch == self.first_epoch and self.skip_batches:
            loader = self.accelerator.skip_first_batches(self.train_loader, self.skip_batches)
        # accelerate's loaders count their own iterations and pass that count on to the sampler as its epoch:
        # set it explicitly, or a resumed run would replay epoch 0's order in its first full epoch.
        loader.set_epoch(epoch)
        if self.sampler.epoch != epoch:  # pragma: no cover - guards against a change in accelerate
            raise RuntimeError(f"data sampler at epoch {self.sampler.epoch}, expected {epoch}: resume would not be "
                               "exact")
        return loader

    def _micro_step(self, batch: dict) -> torch.Tensor:
        """Forward, loss and backward of one micro-batch (an optimizer step when gradients sync); returns every
        process's loss terms (P, 4): loss, recon, mse, kl."""
        acc, cfg, model = self.accelerator, self.config, self.model
        batch = as_float(batch)  # the loader moves the storage dtype (half the bytes); the same values in float32
        if batch["errors"] and cfg.skip_bad_samples:
            if not set(batch["bad_ids"]) <= self.bad_ids:
                logger.warning("skipping bad sample: %s", batch["errors"][0])
            self.bad_ids.update(batch["bad_ids"])
        with acc.accumulate(model):
            inputs, target = T.training_pair(batch["source"], batch["golden"], self.one_step)
            mean, logvar = model(inputs, batch["text"])
            terms = T.sequence_loss(mean, logvar, target, batch["valid"], cfg.kl_weight)
            stop = torch.tensor(float(bool(batch["errors"]) and not cfg.skip_bad_samples), device=mean.device)
            gathered = acc.gather(torch.stack([*(t.detach() for t in terms.values()), stop])[None])
            if gathered[:, -1].any():  # a bad file on any process stops every process with its message
                raise UserError(batch["errors"][0] if batch["errors"] and not cfg.skip_bad_samples else
                                "another process hit a bad sample (see its error); training stopped")
            gathered = gathered[:, :-1]  # (P, 4): loss, recon, mse, kl of each process
            T.check_finite(gathered[:, 0], "loss", self.global_step + 1, self.last_checkpoint)
            acc.backward(terms["loss"])
            if acc.sync_gradients:
                if cfg.max_grad_norm > 0:
                    self.grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                else:
                    self.grad_norm = torch.linalg.vector_norm(torch.stack(
                        [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]))
                if acc.mixed_precision != "fp16":  # fp16's GradScaler skips overflowing steps itself
                    T.check_finite(self.grad_norm, "gradient norm", self.global_step + 1, self.last_checkpoint)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return gathered

    def _log_losses(self, epoch: int) -> None:
        """Log the window's mean losses (tracker, log line, progress bar) and open a new window."""
        step = self.global_step
        logs = {**self.window.means(), "train/lr": self.lr_scheduler.get_last_lr()[0],
                "train/grad_norm": float(self.grad_norm), "train/epoch": epoch}
        self.accelerator.log(logs, step=step)
        logger.info("step %d/%d epoch %d: loss %.5g mse %.5g kl %.4g lr %.3g grad_norm %.3g, %.1f samples/s",
                    step, self.total_steps, epoch, logs["train/loss"], logs["train/mse"], logs["train/kl"],
                    logs["train/lr"], logs["train/grad_norm"], logs["train/samples_per_s"])
        self.bar.set_postfix(loss=f"{logs['train/loss']:.4g}", refresh=False)
        self.window = LossWindow()

    # ---- validate, save, export ----------------------------------------------------------------------------
    def validate(self) -> dict | None:
        """Held-out errors of the model vs the identity baselines (core.summarize_validation), logged."""
        if self.val_loader is None:
            return None
        acc = self.accelerator
        net = acc.unwrap_model(self.model)
        parts: dict[str, list] = {}
        for batch in map(as_float, self.val_loader):
            if batch["errors"] and not self.config.skip_bad_samples:
                raise UserError(batch["errors"][0])
            with acc.autocast():
                errs = T.validation_errors(net, batch)
            errs["valid"] = batch["valid"]
            for k, v in acc.gather_for_metrics(errs).items():
                parts.setdefault(k, []).append(v.cpu())
        cat = {k: torch.cat(v) for k, v in parts.items()}
        keep = cat.pop("valid")
        if not keep.any():
            return None
        report = T.summarize_validation({k: v[keep] for k, v in cat.items()}, self.data.validation.seq_len)
        tf, final = report["teacher_forcing"], report["final_step"]
        acc.log({"val/teacher_forcing_model_mse": tf["model_mse"],
                 "val/teacher_forcing_identity_mse": tf["baseline_mse"],
                 "val/teacher_forcing_explained": tf["explained_fraction"],
                 "val/rollout_final_model_mse": final["model_mse"],
                 "val/rollout_final_baseline_mse": final["baseline_mse"],
                 "val/rollout_final_explained": final["explained_fraction"]}, step=self.global_step)
        logger.info("validation @ step %d: teacher forcing explained %.4f (model mse %.4g vs identity %.4g); "
                    "rollout step %d explained %.4f (model %.4g vs x_T %.4g)", self.global_step,
                    tf["explained_fraction"], tf["model_mse"], tf["baseline_mse"], report["num_steps"],
                    final["explained_fraction"], final["model_mse"], final["baseline_mse"])
        return report

    def save(self, step: int) -> Path:
        """Write the resumable `checkpoint-{step}` (through a temp folder renamed when complete) and prune. A write
        that fails (a full disk) stops every process with one line; the earlier checkpoints are left as they were."""
        from accelerate.utils import gather_object

        acc, out = self.accelerator, self.output_dir
        final, tmp = out / f"checkpoint-{step}", out / f".checkpoint-{step}.tmp"
        if self.is_main and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        try:  # every process writes its random state; the main process the rest
            acc.save_state(str(tmp))
            failed = ""
        except OSError as e:
            failed = one_line(e)
        failures = [f for f in gather_object([failed]) if f]
        if failures:
            on_main(acc, lambda: shutil.rmtree(tmp, ignore_errors=True))
            self._save_failed(final, failures[0])

        def publish() -> None:
            try:
                atomic_write_json(tmp / C.TRAINING_STATE, {
                    "global_step": step, "epoch": step // self.updates_per_epoch,
                    "model_config": self.model_config.to_dict(), "num_processes": acc.num_processes,
                    "args": self.config.record(self.arch)})
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                self._save_failed(final, one_line(e))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in C.prune_checkpoints(out, self.config.max_checkpoints):
                logger.info("removed old checkpoint %s", old)
            logger.info("saved %s", final)

        on_main(acc, publish)  # a failure there is raised on every process
        return final

    def _save_failed(self, checkpoint: Path, reason: str) -> None:
        raise UserError(f"cannot write {checkpoint} ({reason}): training stopped at step {self.global_step}, "
                        f"{T.what_is_kept(self.last_checkpoint)}; free space on that disk or choose another "
                        "--output_dir")

    def export(self, report: dict | None) -> dict:
        """Write the final export (weights + config JSON) and validation.json on the main process; returns the
        summary."""
        acc, data, cfg = self.accelerator, self.data, self.config
        summary = {"global_step": self.global_step, "num_processes": acc.num_processes,
                   "train_samples": len(data.train), "validation_samples": len(data.validation),
                   "validation_ids": data.validation.ids,
                   "skipped_bad_samples": len(self.bad_ids | set(data.dropped_ids)),
                   "missing_files": len(data.missing), "damaged_files": len(data.damaged),
                   "model_type": cfg.model_type, "golden_change_rms": self.delta_scale, "parameters": self.n_params,
                   "mixed_precision": acc.mixed_precision, "validation": report}
        if self.is_main:
            net = acc.unwrap_model(self.model)
            training = {"args": self.config.record(self.arch),
                        **{k: v for k, v in summary.items() if k != "validation_ids"},
                        "data_fingerprint": dataset_fingerprint(data.root)}
            self.export_paths = net.save_pretrained(self.output_dir / FINAL_STEM,
                                                    {"run_config": data.run_config, "training": training})
            atomic_write_json(self.output_dir / "validation.json", summary)
            logger.info("saved %s and %s", *self.export_paths)
        return summary

    def push(self) -> str:
        """(Main process) upload the final export to --push_to_hub with its model card; returns the commit URL."""
        cfg = self.config
        try:
            url = push_export(self.export_paths[0], cfg.push_to_hub, token=cfg.hub_token,
                              private=cfg.hub_private_repo or None)
        except UserError as e:
            raise UserError(f"{e} (the export {self.export_paths[0]} is saved: push it later with python "
                            f"scripts/push_model.py {self.output_dir} {cfg.push_to_hub})") from None
        logger.info("pushed %s to the Hugging Face Hub: %s", self.export_paths[0].name, url)
        return url

    def close(self) -> None:
        """Release the prepared objects (stopping the loaders' worker processes), the trackers and the lock."""
        self.model = self.optimizer = self.lr_scheduler = self.train_loader = self.val_loader = None
        if self.accelerator is not None:
            self.accelerator.free_memory()
            self.accelerator.end_training()
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def _close_inherited_fd(fd: int | None, worker_id: int) -> None:
    """A loader worker's first act: close its copy of the output dir's lock, so the lock dies with the training
    process (also on kill -9) instead of lingering in workers that outlive it by seconds."""
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def _open_data(cfg: TrainingConfig):
    """The dataset, every file of both splits verified before the first step; with --min_reward_gain, the training
    samples whose recorded reward gain reaches it; with --train_fraction, that share of them (nested by id hash)."""
    data = open_dataset(cfg.dataset_dir, cfg.validation_fraction, cfg.max_seq_len, cfg.skip_bad_samples,
                        return_errors=True, keep_dtype=True)
    if cfg.min_reward_gain is not None:
        data.train = T.keep_reward_gain(data, cfg.min_reward_gain)
    if cfg.train_fraction < 1.0:
        data.train = T.keep_fraction(data.train, cfg.train_fraction)
    return data


def done_message(summary: dict, weights: Path) -> str:
    """The one line the CLI prints at the end."""
    report, procs = summary["validation"], summary["num_processes"]
    if not report:
        return f"done: {summary['global_step']} steps on {procs} process(es), no validation set; export {weights}"
    if is_one_step(summary.get("model_type")):  # a one-step model: no rollout, no teacher forcing
        return (f"done: {summary['global_step']} steps on {procs} process(es); held-out {report['num_samples']} "
                f"samples: the {summary['model_type']} model's one-step prediction of x'_{report['num_steps']} "
                f"explains {report['final_step']['explained_fraction']:.4f} of the golden change; export {weights}")
    return (f"done: {summary['global_step']} steps on {procs} process(es); held-out {report['num_samples']} samples: "
            f"rollout step {report['num_steps']} explains {report['final_step']['explained_fraction']:.4f} of the "
            f"golden change (teacher forcing {report['teacher_forcing']['explained_fraction']:.4f}); export {weights}")
