#!/usr/bin/env python
"""Stage 3: train NoiseSequenceRNN_v3 on a golden-noise sequence dataset (accelerate: 1..N GPUs, CPU too).

    accelerate launch src/train_rnn_model_v3.py --dataset_dir ./data/npd_sequence_dataset_sdxl/ \\
        --output_dir ./output/rnn_v3_seq_model_output/ --predict_variance --kl_weight 0.01 --mixed_precision fp16

The latent shape and text-embedding size come from the dataset's run_config.json. Rerun with
`--resume_from_checkpoint latest` to continue exactly where a run stopped. The final export is
`<output_dir>/rnn_v3_model_final.safetensors` + `.json` (model config, dataset run_config, validation).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from golden_noise.errors import UserError

from golden_noise.io import atomic_write_json
from golden_noise.cli import check_flag_minimum
from golden_noise.runtime import exit_cli, get_logger, gloo_launch, run_cli, setup_logging

logger = get_logger("train_rnn_model_v3")

ARCH_FLAGS = ("text_proj_dim", "cnn_base_filters", "cnn_num_blocks", "cnn_max_filters", "cnn_feat_dim",
              "gru_hidden_size", "gru_num_layers", "dropout", "norm_groups", "predict_variance")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset_dir", default="./data/npd_sequence_dataset_sdxl/",
                   help="dataset written by generate_npd_series.py (metadata.csv, run_config.json, sequences/)")
    g.add_argument("--output_dir", default="./output/rnn_v3_seq_model_output/",
                   help="checkpoints, tensorboard logs, validation.json and the final export")
    g.add_argument("--validation_fraction", type=float, default=0.1,
                   help="fraction of sample ids held out for validation (deterministic split by id)")
    g.add_argument("--max_seq_len", type=int, default=None, help="train on the first N golden steps only")
    g.add_argument("--skip_bad_samples", action="store_true",
                   help="skip (and count) samples with missing or corrupt files instead of stopping")
    g.add_argument("--dataloader_num_workers", type=int, default=2, help="data-loading worker processes per GPU")
    g = p.add_argument_group("model (shape flags must agree with the dataset's run_config.json)")
    g.add_argument("--noise_resolution", type=int, default=None,
                   help="H = W of the noise; default and check: the dataset's latent_shape")
    g.add_argument("--text_embed_dim", type=int, default=None,
                   help="text-embedding size; default and check: the dataset's text_embedding.dim")
    g.add_argument("--text_proj_dim", type=int, default=256, help="size the text embedding is projected to")
    g.add_argument("--cnn_base_filters", type=int, default=64,
                   help="channels of the first CNN stage (doubled per stage)")
    g.add_argument("--cnn_num_blocks", type=int, nargs="+", default=[2, 2, 2, 2],
                   help="residual blocks per CNN stage; every stage after the first halves the resolution")
    g.add_argument("--cnn_max_filters", type=int, default=512, help="cap on the channels of a CNN stage")
    g.add_argument("--cnn_feat_dim", type=int, default=512, help="pooled CNN feature size fed to the GRU")
    g.add_argument("--gru_hidden_size", type=int, default=1024, help="GRU hidden size")
    g.add_argument("--gru_num_layers", type=int, default=2, help="GRU layers")
    g.add_argument("--dropout", type=float, default=0.1, help="dropout on the GRU input/output and between layers")
    g.add_argument("--norm_groups", type=int, default=32, help="GroupNorm groups")
    g.add_argument("--predict_variance", action="store_true",
                   help="also predict a log-variance and train with the Gaussian NLL instead of MSE")
    g.add_argument("--base_model_id", default=None,
                   help="accepted for compatibility: the base model is the one recorded in run_config.json")
    g.add_argument("--npnet_model_id", default=None, help="accepted for compatibility; not used by this model")
    g = p.add_argument_group("optimisation")
    g.add_argument("--kl_weight", type=float, default=0.0, help="weight of KL(predicted Gaussian || N(0, I))")
    g.add_argument("--num_epochs", type=int, default=50, help="epochs (ignored when --max_train_steps is set)")
    g.add_argument("--max_train_steps", type=int, default=None, help="optimizer steps in total; overrides --num_epochs")
    g.add_argument("--batch_size", type=int, default=8, help="samples per device per micro-batch")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--learning_rate", type=float, default=1e-4, help="peak AdamW learning rate")
    g.add_argument("--weight_decay", type=float, default=1e-2, help="AdamW weight decay")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2")
    g.add_argument("--lr_warmup_steps", type=int, default=None,
                   help="linear warmup steps before the cosine decay (default: 5%% of the steps, at most 500)")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm (0: no clipping)")
    g.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"],
                   help="autocast precision (fp16 needs a GPU; on CPU it trains in float32)")
    g.add_argument("--seed", type=int, default=42, help="seed of the model init, the data order and dropout")
    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--save_steps", type=int, default=1000, help="save a resumable checkpoint-{step} every N steps")
    g.add_argument("--max_checkpoints", type=int, default=3, help="keep only the newest N checkpoints (0: keep all)")
    g.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint-{step} folder")
    g.add_argument("--validation_steps", type=int, default=500, help="validate every N steps (and always at the end)")
    g.add_argument("--logging_steps", type=int, default=10, help="log the training losses every N steps")
    g.add_argument("--report_to", default="tensorboard", choices=["tensorboard", "none"], help="experiment tracker")
    args = p.parse_args(argv)
    positive = ("batch_size", "gradient_accumulation_steps", "num_epochs", "save_steps", "logging_steps",
                "max_train_steps", "max_seq_len", "noise_resolution", "text_embed_dim", "cnn_base_filters",
                "cnn_feat_dim", "gru_hidden_size", "gru_num_layers", "text_proj_dim", "norm_groups")
    check_flag_minimum(p, args, positive)
    check_flag_minimum(p, args, ("dataloader_num_workers", "max_checkpoints", "validation_steps", "kl_weight",
                                 "max_grad_norm", "weight_decay", "lr_warmup_steps"), minimum=0)
    if any(b < 1 for b in args.cnn_num_blocks):
        p.error(f"--cnn_num_blocks must all be at least 1, got {args.cnn_num_blocks}")
    if not 0.0 <= args.dropout < 1.0:
        p.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if not args.learning_rate > 0:
        p.error(f"--learning_rate must be positive, got {args.learning_rate}")
    if not 0.0 <= args.validation_fraction < 1.0:
        p.error(f"--validation_fraction must be in [0, 1), got {args.validation_fraction}")
    return args


def build_config(args, data, resume_dir: Path | None):
    """The model config: shapes from run_config.json, architecture from the flags, delta_scale from the data
    (or, when resuming, the checkpoint's config, which the flags must match)."""
    from golden_noise.sequence_data import golden_change_rms
    from golden_noise.model.rnn_seq_model_v3 import NoiseSequenceRNNConfig

    c, h, w = data.latent_shape
    path = Path(args.dataset_dir) / "run_config.json"
    if h != w:
        raise UserError(f"{path}: latent_shape {[c, h, w]} is not square; NoiseSequenceRNN_v3 needs H == W")
    if args.noise_resolution is not None and args.noise_resolution != h:
        raise UserError(f"--noise_resolution {args.noise_resolution} contradicts the dataset's latent_shape "
                        f"{[c, h, w]} ({path}): drop the flag or pass --noise_resolution {h}")
    if args.text_embed_dim is not None and args.text_embed_dim != data.text_dim:
        raise UserError(f"--text_embed_dim {args.text_embed_dim} contradicts the dataset's text_embedding.dim "
                        f"{data.text_dim} ({path}): drop the flag or pass --text_embed_dim {data.text_dim}")
    arch = {k: getattr(args, k) for k in ARCH_FLAGS}
    if resume_dir is not None:
        state = read_training_state(resume_dir)
        config = NoiseSequenceRNNConfig.from_dict(state["model_config"])
        saved = {k: getattr(config, k) for k in ARCH_FLAGS}
        diff = [f"--{k} {arch[k]} (checkpoint: {saved[k]})" for k in ARCH_FLAGS if arch[k] != saved[k]]
        if diff or (config.latent_channels, config.noise_resolution, config.text_embed_dim) != (c, h, data.text_dim):
            raise UserError(f"{resume_dir} was trained with another model config: {'; '.join(diff) or 'data shape'}: "
                            "resume with the original flags or start a new --output_dir")
        return config
    delta_scale = golden_change_rms(data.train, skip_bad_samples=args.skip_bad_samples)
    try:
        return NoiseSequenceRNNConfig(latent_channels=c, noise_resolution=h, text_embed_dim=data.text_dim,
                                      delta_scale=delta_scale, **arch)
    except ValueError as e:
        raise UserError(f"invalid model flags: {e}") from None


def read_training_state(ckpt: Path) -> dict:
    path = Path(ckpt) / "training_state.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{ckpt} is not a complete checkpoint ({path}: {e}): pass another one") from None


def main(args: argparse.Namespace) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, gather_object, set_seed
    from torch.utils.data import DataLoader

    from golden_noise.training import core as T
    from golden_noise.sequence_data import collate, open_dataset
    from golden_noise.model.rnn_seq_model_v3 import FINAL_STEM, NoiseSequenceRNN_v3

    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to, step_scheduler_with_optimizer=False,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")))
    setup_logging(accelerator.is_main_process, quiet_diffusion_libraries=False)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # per-file checkpoint messages
    main_proc = accelerator.is_main_process
    if args.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        logger.warning("--mixed_precision fp16 has no effect on CPU: training in float32")

    data = open_dataset(args.dataset_dir, args.validation_fraction, args.max_seq_len, args.skip_bad_samples,
                        return_errors=True)
    run_config = data.run_config
    if args.base_model_id and args.base_model_id != run_config.get("base_model_id"):
        logger.warning("--base_model_id %s differs from the dataset's %s: the dataset's is recorded",
                       args.base_model_id, run_config.get("base_model_id"))
    if args.npnet_model_id:
        logger.info("--npnet_model_id %s is not used by NoiseSequenceRNN_v3 (recorded only)", args.npnet_model_id)
    resume_dir = T.resolve_resume(output_dir, args.resume_from_checkpoint)
    if args.resume_from_checkpoint == "latest" and resume_dir is None:
        logger.info("--resume_from_checkpoint latest: no checkpoint in %s yet, starting a new run", output_dir)
    config = build_config(args, data, resume_dir)

    set_seed(args.seed)
    model = NoiseSequenceRNN_v3(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                                  betas=(args.adam_beta1, args.adam_beta2))
    sampler = T.EpochSampler(len(data.train), args.seed)
    workers = args.dataloader_num_workers
    loader_kw = dict(batch_size=args.batch_size, collate_fn=collate, num_workers=workers,
                     pin_memory=accelerator.device.type == "cuda", persistent_workers=workers > 0)
    train_loader = DataLoader(data.train, sampler=sampler, generator=torch.Generator().manual_seed(args.seed),
                              **loader_kw)
    val_loader = DataLoader(data.validation, shuffle=False, **loader_kw) if len(data.validation) else None
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)

    accum = args.gradient_accumulation_steps
    updates_per_epoch = math.ceil(len(train_loader) / accum)
    if args.max_train_steps:
        total_steps = args.max_train_steps
        num_epochs = math.ceil(total_steps / updates_per_epoch)
    else:
        num_epochs = args.num_epochs
        total_steps = num_epochs * updates_per_epoch
    warmup = args.lr_warmup_steps if args.lr_warmup_steps is not None else min(500, total_steps // 20)
    lr_scheduler = accelerator.prepare(T.warmup_cosine_schedule(optimizer, warmup, total_steps))
    set_seed(args.seed, device_specific=True)  # dropout differs per process; model init above did not

    global_step, first_epoch, skip_batches = 0, 0, 0
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
        global_step = T.checkpoint_step(resume_dir)
        saved_procs = read_training_state(resume_dir).get("num_processes")
        if saved_procs != accelerator.num_processes:
            logger.warning("%s was written by %s process(es), this run has %d: the data order after resuming "
                           "differs from an uninterrupted run", resume_dir, saved_procs, accelerator.num_processes)
        first_epoch, in_epoch = divmod(global_step, updates_per_epoch)
        skip_batches = in_epoch * accum
        logger.info("Resumed from %s: step %d, epoch %d, skipping %d batches", resume_dir, global_step,
                    first_epoch, skip_batches)
    last_checkpoint = resume_dir

    n_params = sum(p.numel() for p in model.parameters())
    eff_batch = args.batch_size * accum * accelerator.num_processes
    logger.info("***** Running training *****")
    precision = accelerator.mixed_precision
    if precision == "fp16" and accelerator.device.type == "cpu":
        precision = "no (fp16 needs a GPU)"
    logger.info("  num_processes=%d, device=%s, mixed_precision=%s", accelerator.num_processes,
                accelerator.device, precision)
    logger.info("  train samples=%d, validation samples=%d, missing files skipped=%d, steps per sequence=%d",
                len(data.train), len(data.validation), len(data.missing), data.train.seq_len)
    logger.info("  latent=%s, text dim=%d, parameters=%.2fM, golden change RMS (delta_scale)=%.4g",
                list(data.latent_shape), data.text_dim, n_params / 1e6, config.delta_scale)
    logger.info("  batch/device=%d, accumulation=%d, effective batch=%d, epochs=%d, optimizer steps=%d, warmup=%d",
                args.batch_size, accum, eff_batch, num_epochs, total_steps, warmup)

    hparams = {**vars(args), "num_processes": accelerator.num_processes, "delta_scale": config.delta_scale,
               "train_samples": len(data.train), "validation_samples": len(data.validation)}
    accelerator.init_trackers("train_rnn_model_v3", config=T.flat_hparams(hparams))

    def save_checkpoint(step: int) -> Path:
        final = output_dir / f"checkpoint-{step}"
        tmp = output_dir / f".checkpoint-{step}.tmp"
        if main_proc and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if main_proc:
            atomic_write_json(tmp / "training_state.json", {
                "global_step": step, "epoch": step // updates_per_epoch, "model_config": config.to_dict(),
                "num_processes": accelerator.num_processes, "args": vars(args)})
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in T.prune_checkpoints(output_dir, args.max_checkpoints):
                logger.info("removed old checkpoint %s", old)
            logger.info("saved %s", final)
        accelerator.wait_for_everyone()
        return final

    def validate() -> dict | None:
        if val_loader is None:
            return None
        net = accelerator.unwrap_model(model)
        parts: dict[str, list] = {}
        for batch in val_loader:
            if batch["errors"] and not args.skip_bad_samples:
                raise UserError(batch["errors"][0])
            with accelerator.autocast():
                errs = T.validation_errors(net, batch)
            errs["valid"] = batch["valid"]
            for k, v in accelerator.gather_for_metrics(errs).items():
                parts.setdefault(k, []).append(v.cpu())
        cat = {k: torch.cat(v) for k, v in parts.items()}
        keep = cat.pop("valid")
        if not keep.any():
            return None
        report = T.summarize_validation({k: v[keep] for k, v in cat.items()})
        accelerator.log({"val/teacher_forcing_model_mse": report["teacher_forcing"]["model_mse"],
                         "val/teacher_forcing_identity_mse": report["teacher_forcing"]["baseline_mse"],
                         "val/teacher_forcing_explained": report["teacher_forcing"]["explained_fraction"],
                         "val/rollout_final_model_mse": report["final_step"]["model_mse"],
                         "val/rollout_final_baseline_mse": report["final_step"]["baseline_mse"],
                         "val/rollout_final_explained": report["final_step"]["explained_fraction"]},
                        step=global_step)
        logger.info("validation @ step %d: teacher forcing explained %.4f (model mse %.4g vs identity %.4g); "
                    "rollout step %d explained %.4f (model %.4g vs x_T %.4g)", global_step,
                    report["teacher_forcing"]["explained_fraction"], report["teacher_forcing"]["model_mse"],
                    report["teacher_forcing"]["baseline_mse"], report["num_steps"],
                    report["final_step"]["explained_fraction"], report["final_step"]["model_mse"],
                    report["final_step"]["baseline_mse"])
        return report

    bad_ids: set[int] = set()
    sums, n_micro, n_samples, t_log = {}, 0, 0, time.perf_counter()
    grad_norm = torch.tensor(0.0)
    done = global_step >= total_steps
    model.train()
    loader = train_loader
    for epoch in range(first_epoch, num_epochs):
        if done:
            break
        loader = train_loader
        if epoch == first_epoch and skip_batches:
            loader = accelerator.skip_first_batches(train_loader, skip_batches)
        # accelerate's loaders count their own iterations and pass that count on to the sampler as its epoch:
        # set it explicitly, or a resumed run would replay epoch 0's order in its first full epoch.
        loader.set_epoch(epoch)
        if sampler.epoch != epoch:  # pragma: no cover - guards against a change in accelerate
            raise RuntimeError(f"data sampler at epoch {sampler.epoch}, expected {epoch}: resume would not be exact")
        for batch in loader:
            if batch["errors"] and args.skip_bad_samples:
                if not set(batch["bad_ids"]) <= bad_ids:
                    logger.warning("skipping bad sample: %s", batch["errors"][0])
                bad_ids.update(batch["bad_ids"])
            with accelerator.accumulate(model):
                x_prev = T.teacher_forcing_inputs(batch["source"], batch["golden"])  # (B, n, C, H, W)
                mean, logvar = model(x_prev, batch["text"])
                terms = T.sequence_loss(mean, logvar, batch["golden"], batch["valid"], args.kl_weight)
                stop = torch.tensor(float(bool(batch["errors"]) and not args.skip_bad_samples), device=mean.device)
                gathered = accelerator.gather(torch.stack([*(t.detach() for t in terms.values()), stop])[None])
                if gathered[:, -1].any():  # a bad file on any process stops every process with its message
                    raise UserError(batch["errors"][0] if batch["errors"] and not args.skip_bad_samples else
                                    "another process hit a bad sample (see its error); training stopped")
                gathered = gathered[:, :-1]  # (P, 4): loss, recon, mse, kl of each process
                T.check_finite(gathered[:, 0], "loss", global_step + 1, last_checkpoint)
                accelerator.backward(terms["loss"])
                if accelerator.sync_gradients:
                    if args.max_grad_norm > 0:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    else:
                        grad_norm = torch.linalg.vector_norm(torch.stack(
                            [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]))
                    if accelerator.mixed_precision != "fp16":  # fp16's GradScaler skips overflowing steps itself
                        T.check_finite(grad_norm, "gradient norm", global_step + 1, last_checkpoint)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for k, v in zip(terms, gathered.mean(dim=0).tolist()):
                sums[k] = sums.get(k, 0.0) + v
            n_micro += 1
            n_samples += int(accelerator.gather(batch["valid"].sum()[None]).sum())
            if not accelerator.sync_gradients:
                continue
            lr_scheduler.step()
            global_step += 1
            if global_step % args.logging_steps == 0 or global_step == total_steps:
                elapsed = time.perf_counter() - t_log
                logs = {f"train/{k}": v / n_micro for k, v in sums.items()}
                logs.update({"train/lr": lr_scheduler.get_last_lr()[0], "train/grad_norm": float(grad_norm),
                             "train/samples_per_s": n_samples / max(elapsed, 1e-9), "train/epoch": epoch})
                accelerator.log(logs, step=global_step)
                logger.info("step %d/%d epoch %d: loss %.5g mse %.5g kl %.4g lr %.3g grad_norm %.3g, %.1f samples/s",
                            global_step, total_steps, epoch, logs["train/loss"], logs["train/mse"], logs["train/kl"],
                            logs["train/lr"], logs["train/grad_norm"], logs["train/samples_per_s"])
                sums, n_micro, n_samples, t_log = {}, 0, 0, time.perf_counter()
            if global_step % args.save_steps == 0:
                last_checkpoint = save_checkpoint(global_step)
            if args.validation_steps and global_step % args.validation_steps == 0 and global_step < total_steps:
                validate()
                model.train()
            if global_step >= total_steps:
                done = True
                break

    accelerator.wait_for_everyone()
    bad_ids = set().union(*gather_object([bad_ids]))
    report = validate()
    summary = {"global_step": global_step, "num_processes": accelerator.num_processes,
               "train_samples": len(data.train), "validation_samples": len(data.validation),
               "validation_ids": data.validation.ids, "skipped_bad_samples": len(bad_ids),
               "missing_files": len(data.missing), "golden_change_rms": config.delta_scale,
               "parameters": n_params, "validation": report}
    if main_proc:
        net = accelerator.unwrap_model(model)
        training = {"args": vars(args), **{k: v for k, v in summary.items() if k != "validation_ids"}}
        weights, meta = net.save_pretrained(output_dir / FINAL_STEM, {"run_config": run_config, "training": training})
        atomic_write_json(output_dir / "validation.json", summary)
        logger.info("saved %s and %s", weights, meta)
        if report:
            print(f"done: {global_step} steps on {accelerator.num_processes} process(es); held-out "
                  f"{report['num_samples']} samples: rollout step {report['num_steps']} explains "
                  f"{report['final_step']['explained_fraction']:.4f} of the golden change "
                  f"(teacher forcing {report['teacher_forcing']['explained_fraction']:.4f}); export {weights}")
        else:
            print(f"done: {global_step} steps on {accelerator.num_processes} process(es), no validation set; "
                  f"export {weights}")
    # Leave the process group together, after releasing the prepared objects (which stops the loaders' worker
    # processes); on CPU the process then exits through runtime.exit_cli (see there for why).
    accelerator.wait_for_everyone()
    del model, optimizer, lr_scheduler, train_loader, val_loader, loader
    accelerator.free_memory()
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    exit_cli(run_cli(main, parse_args), skip_teardown=gloo_launch())
