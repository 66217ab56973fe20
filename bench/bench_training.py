#!/usr/bin/env python
"""Bench stage 3 (training): training samples/s and data-loader headroom (loader samples/s / model samples/s)
measured side by side on CPU, on the sharded dataset stage 2 writes; and the default SDXL-size model's parameters
and FLOPs (per step, per training sample, and a 10-step rollout as a fraction of a 30-step SDXL sampling with CFG).
bench_dataset.py measures the loader at SDXL size against the GPU's measured training rate.

    python bench/bench_training.py            # tiny-size and SDXL-size datasets, one SDXL-size CPU step
    python bench/bench_training.py --quick    # seconds: tiny size only, FLOPs on the meta device
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: E402  (bench/common.py; this script's folder is on sys.path)

import torch  # noqa: E402

H100_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H100 SXM datasheet, dense BF16 tensor-core peak
ASSUMED_MFU = 0.4               # model FLOP utilisation assumed for the GPU estimate


def parse_args(argv=None):
    p = common.bench_args(__doc__)
    p.add_argument("--batch_size", type=int, default=8, help="samples per training step / loader batch")
    p.add_argument("--num_workers", type=int, nargs="+", default=[0, 2], help="data-loader workers to compare")
    p.add_argument("--steps", type=int, default=None, help="timed training steps at tiny size (default 30, quick 10)")
    p.add_argument("--num_samples", type=int, default=None, help="samples per synthetic dataset (default 64, quick 32)")
    p.add_argument("--sdxl_num_steps", type=int, default=10, help="n of the SDXL-size sequences")
    p.add_argument("--skip_sdxl_cpu_step", action="store_true", help="do not time one SDXL-size training step on CPU")
    args = p.parse_args(argv)
    args.steps = args.steps or (10 if args.quick else 30)
    args.num_samples = args.num_samples or (32 if args.quick else 64)
    if args.quick:
        args.skip_sdxl_cpu_step = True
    if args.threads is None:
        args.threads = 1  # stable ratios on shared CPUs
    return args


def tiny_config(**kw):
    from golden_noise.model.rnn_seq_model_v3 import NoiseSequenceRNNConfig

    base = dict(latent_channels=4, noise_resolution=16, text_embed_dim=32, text_proj_dim=32, cnn_base_filters=8,
                cnn_num_blocks=[1, 1], cnn_feat_dim=32, gru_hidden_size=32, gru_num_layers=1, norm_groups=8)
    return NoiseSequenceRNNConfig(**{**base, **kw})


def train_rate(config, batch: dict, steps: int) -> float:
    """Training samples/s of the real step (teacher forcing, loss, backward, clipping, AdamW) on one batch."""
    from golden_noise.training import core as T
    from golden_noise.model.rnn_seq_model_v3 import NoiseSequenceRNN_v3

    torch.manual_seed(0)
    model = NoiseSequenceRNN_v3(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        x_prev = T.teacher_forcing_inputs(batch["source"], batch["golden"])
        mean, logvar = model(x_prev, batch["text"])
        loss = T.sequence_loss(mean, logvar, batch["golden"], batch["valid"], 0.01)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch["source"].shape[0] / (time.perf_counter() - t0)


def sdxl_flops(n: int) -> dict:
    """Default config at SDXL size on the meta device: parameters, forward FLOPs per step, training FLOPs per
    sample (forward + backward over n teacher-forced steps), n-step rollout vs a 30-step CFG SDXL sampling."""
    from golden_noise.model.rnn_seq_model_v3 import NoiseSequenceRNN_v3, NoiseSequenceRNNConfig

    cfg = NoiseSequenceRNNConfig(predict_variance=True)
    with torch.device("meta"):
        model = NoiseSequenceRNN_v3(cfg)
        x1, seq, text = torch.empty(1, 1, 4, 128, 128), torch.empty(1, n, 4, 128, 128), torch.empty(1, 1280)
    with torch.no_grad():
        step = common.count_flops(model, x1, text)

    def train_step():
        mean, logvar = model(seq, text)
        (mean.float().square().mean() + logvar.float().mean()).backward()

    train = common.count_flops(train_step)
    sdxl_sampling = 60 * common.SDXL_UNET_TFLOPS_1024 * 1e12  # 30 steps x 2 CFG branches
    return {"parameters": sum(p.numel() for p in model.parameters()), "forward_tflops_per_step": step / 1e12,
            "train_tflops_per_sample": train / 1e12, "rollout_tflops": n * step / 1e12,
            "rollout_fraction_of_sdxl_sampling": n * step / sdxl_sampling}


def main(argv=None) -> int:
    args = parse_args(argv)
    common.setup(args)
    from golden_noise.dataset.reader import as_float, collate, open_dataset
    from golden_noise.model.rnn_seq_model_v3 import NoiseSequenceRNNConfig

    results: dict = {"args": vars(args)}
    flops = sdxl_flops(args.sdxl_num_steps)
    results["sdxl_model"] = flops
    common.print_table([flops], list(flops), "default model at SDXL size (4x128x128 noise, 1280-d text), meta device")

    rows, ratios = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        sizes = [("tiny", (4, 16, 16), 4, 32)]
        if not args.quick:
            sizes.append(("sdxl", (4, 128, 128), args.sdxl_num_steps, 1280))
        for name, shape, n, dim in sizes:
            root = common.write_sharded_dataset(Path(tmp) / name, args.num_samples, n, shape, dim, args.batch_size)
            data = open_dataset(root, validation_fraction=0.0, keep_dtype=True).train  # as the trainer reads
            batch = as_float(collate([data[i] for i in range(args.batch_size)]))
            mb = sum(p.stat().st_size for p in (root / "data").iterdir()) / args.num_samples / 2**20
            if name == "tiny":
                model_sps = train_rate(tiny_config(predict_variance=True), batch, args.steps)
                # the default-size architecture (35M params at SDXL size) on these small latents
                default_sps = train_rate(NoiseSequenceRNNConfig(latent_channels=shape[0], noise_resolution=shape[1],
                                                                text_embed_dim=dim, predict_variance=True),
                                         batch, max(2, args.steps // 5))
            elif not args.skip_sdxl_cpu_step:
                one = {k: (v[:1] if torch.is_tensor(v) else v) for k, v in batch.items()}
                model_sps = train_rate(NoiseSequenceRNNConfig(predict_variance=True), one, 1)
            else:
                model_sps = None
            for w in args.num_workers:
                sps = common.loader_rate(data, args.batch_size, w, min_samples=4 * args.num_samples)
                row = {"size": name, "workers": w, "MiB/sample": mb, "loader_samples_s": sps,
                       "cpu_train_samples_s": model_sps, "headroom": sps / model_sps if model_sps else None}
                rows.append(row)
                if model_sps:
                    ratios[f"{name}_loader_headroom_workers{w}"] = sps / model_sps
                if name == "tiny":
                    rows.append({"size": f"default@{shape[1]}", "workers": w, "MiB/sample": mb,
                                 "loader_samples_s": sps, "cpu_train_samples_s": default_sps,
                                 "headroom": sps / default_sps})
                    ratios[f"default_model_small_latents_loader_headroom_workers{w}"] = sps / default_sps
                if name == "sdxl":
                    gpu_sps = ASSUMED_MFU * H100_BF16_DENSE_TFLOPS / flops["train_tflops_per_sample"]
                    row["est_h100_train_samples_s"] = gpu_sps
                    ratios[f"sdxl_loader_headroom_vs_est_h100_workers{w}"] = sps / gpu_sps
    results["rows"] = rows
    common.print_table(rows, ["size", "workers", "MiB/sample", "loader_samples_s", "cpu_train_samples_s",
                              "headroom", "est_h100_train_samples_s"],
                       f"data loader vs training step (batch {args.batch_size}, {args.threads} thread(s))")
    ratios["sdxl_rollout_fraction_of_sdxl_sampling"] = flops["rollout_fraction_of_sdxl_sampling"]
    results["ratios"] = ratios
    if any(r["size"] == "sdxl" for r in rows):
        print(f"\nGPU estimate: {ASSUMED_MFU:.0%} of an H100's {H100_BF16_DENSE_TFLOPS:g} dense BF16 TFLOP/s at "
              f"{flops['train_tflops_per_sample']:.3g} TFLOPs per training sample; headroom < 1 means more workers.")
    checks = {"10-step rollout <= 1% of a 30-step CFG SDXL sampling":
              flops["rollout_fraction_of_sdxl_sampling"] <= 0.01}
    tiny = [r for r in rows if r["size"] == "tiny" and r["headroom"]]
    if tiny:
        checks["tiny-size loader keeps up with the CPU training step (best headroom >= 1)"] = \
            max(r["headroom"] for r in tiny) >= 1
    default = [r for r in rows if r["size"].startswith("default@")]
    if default:
        checks["default-size model on small latents: loader headroom >= 3"] = max(r["headroom"] for r in default) >= 3
    return common.finish(results, args, checks)


if __name__ == "__main__":
    sys.exit(main())
