#!/usr/bin/env python
"""Bench stages 4-5 (inference): the RNN rollout's FLOPs as a fraction of a 30-step SDXL sampling with CFG,
counted on the meta device from SDXL's public configs (no weights), for the default model config; and the
wall-time ratio of rollout to sampling on the tiny pipeline, measured side by side.

    python bench/bench_inference.py            # 5 interleaved rounds of the wall-time comparison
    python bench/bench_inference.py --quick    # seconds
"""
from __future__ import annotations

import sys
import time

import common  # noqa: E402  (bench/common.py; this script's folder is on sys.path)

import torch  # noqa: E402

from golden_noise.cli import finite_float  # noqa: E402  (NaN and infinities are refused)


def parse_args(argv=None):
    p = common.bench_args(__doc__)
    p.add_argument("--num_inference_steps", type=int, default=30, help="sampling steps of the pipeline")
    p.add_argument("--guidance_scale", type=finite_float, default=5.5, help="CFG of the sampling (> 1: two branches)")
    p.add_argument("--num_gen_steps", type=int, default=10, help="n: RNN rollout steps")
    p.add_argument("--resolution", type=int, default=1024, help="SDXL image size (px) of the FLOP count")
    p.add_argument("--rounds", type=int, default=None, help="interleaved wall-time rounds (default 5, quick 1)")
    p.add_argument("--batch_size", type=int, default=1, help="prompts per rollout / sampling call (wall time)")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 5)
    if args.threads is None:
        args.threads = 1  # stable ratios on shared CPUs
    return args


def text_encoder_flops() -> int:
    """FLOPs of SDXL's two text encoders on one 77-token prompt (what the rollout's text embedding costs)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    total = 0
    for cls, cfg in zip((CLIPTextModel, CLIPTextModelWithProjection), common.SDXL_TEXT_ENCODER_CONFIGS):
        with torch.device("meta"):
            model = cls(CLIPTextConfig(**cfg)).eval()
        ids = torch.zeros(1, common.SDXL_TEXT_TOKENS, dtype=torch.long, device="meta")
        with torch.no_grad():
            total += common.count_flops(model, ids, output_hidden_states=True)
    return total


def flop_fractions(args) -> dict:
    """Rollout FLOPs of the default NoiseSequenceRNN_v3 vs SDXL sampling, all on the meta device."""
    from golden_noise.model.rnn_seq_model_v3 import NoiseSequenceRNN_v3, NoiseSequenceRNNConfig

    latent = args.resolution // 8
    unet = common.build_sdxl_unet()
    unet_flops = common.unet_forward_flops(unet, 1, (latent, latent), (args.resolution, args.resolution))
    del unet
    vae = common.build_sdxl_vae()
    with torch.no_grad():
        vae_flops = common.count_flops(vae.decode, torch.empty(1, 4, latent, latent, device="meta"))
    del vae
    text_flops = text_encoder_flops()
    config = NoiseSequenceRNNConfig(noise_resolution=latent)
    with torch.device("meta"):
        rnn = NoiseSequenceRNN_v3(config)
    params = sum(p.numel() for p in rnn.parameters())
    rollout_flops = common.count_flops(rnn.generate_sequence, torch.empty(1, 4, latent, latent, device="meta"),
                                       torch.empty(1, config.text_embed_dim, device="meta"), args.num_gen_steps)
    branches = 2 if args.guidance_scale not in (0.0, 1.0) else 1
    sampling_unet = args.num_inference_steps * branches * unet_flops
    sampling_full = sampling_unet + vae_flops + text_flops
    print(f"FLOPs at {args.resolution}^2, batch 1 (meta device, SDXL's public configs):")
    print(f"  UNet forward            {unet_flops / 1e12:8.3f} TFLOPs  (DESIGN.md: {common.SDXL_UNET_TFLOPS_1024})")
    print(f"  VAE decode              {vae_flops / 1e12:8.3f} TFLOPs")
    print(f"  text encoders (1+2)     {text_flops / 1e12:8.3f} TFLOPs")
    print(f"  sampling, {args.num_inference_steps} steps x {branches} CFG branches: {sampling_unet / 1e12:.1f} TFLOPs "
          f"in the UNet, {sampling_full / 1e12:.1f} with VAE decode and text encoding")
    print(f"  RNN rollout, n={args.num_gen_steps}, default config ({params / 1e6:.1f} M params): "
          f"{rollout_flops / 1e12:.4f} TFLOPs")
    return {"unet_forward_tflops": unet_flops / 1e12, "vae_decode_tflops": vae_flops / 1e12,
            "text_encoders_tflops": text_flops / 1e12, "sampling_unet_tflops": sampling_unet / 1e12,
            "sampling_full_tflops": sampling_full / 1e12, "rollout_tflops": rollout_flops / 1e12,
            "rnn_params": params, "rnn_config": config.to_dict(),
            "rollout_fraction": rollout_flops / sampling_unet,
            "rollout_fraction_of_full_pipeline": rollout_flops / sampling_full,
            "rollout_plus_text_fraction": (rollout_flops + text_flops) / sampling_unet}


def wall_times(args) -> dict:
    """Rollout (text embedding + RNN) vs sampling wall time on the tiny pipeline, interleaved rounds."""
    from golden_noise.diffusion import sample_images, seeded_noise
    from golden_noise.inference import GoldenNoise
    from golden_noise.model.rnn_seq_model_v3 import NoiseSequenceRNN_v3, NoiseSequenceRNNConfig

    pipe = common.tiny_pipeline(seed=0)
    c, size = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    config = NoiseSequenceRNNConfig(latent_channels=c, noise_resolution=size,
                                    text_embed_dim=pipe.text_encoder_2.config.projection_dim)
    torch.manual_seed(0)
    model = NoiseSequenceRNN_v3(config).eval()
    meta = {"model_config": config.to_dict(), "run_config": {"num_steps": args.num_gen_steps,
                                                             "latent_shape": [c, size, size]}}
    gn = GoldenNoise(model, meta, pipe=pipe, device="cpu")
    prompts = [f"a small red shape number {i}" for i in range(args.batch_size)]
    x_T = seeded_noise(list(range(args.batch_size)), (c, size, size))

    def rollout():
        return gn.rollout(x_T, gn.text_embeddings(prompts, pipe), args.num_gen_steps)[:, -1]

    def sampling():
        return sample_images(pipe, prompts, x_T, args.num_inference_steps, args.guidance_scale)

    rollout(), sampling()  # warm-up
    times = {"rollout": [], "sampling": []}
    for _ in range(args.rounds):
        for name, fn in (("rollout", rollout), ("sampling", sampling)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    flops = {"rollout": common.count_flops(rollout), "sampling": common.count_flops(sampling),
             "unet": common.unet_forward_flops(pipe.unet, 1, (size, size), (size, size))}
    unet_k = sum(p.numel() for p in pipe.unet.parameters()) / 1e3
    print(f"\ntiny pipeline (latents {c}x{size}x{size}, UNet {unet_k:.0f} k "
          f"params) vs the default-width RNN at that size ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M "
          f"params), batch {args.batch_size}, best of {args.rounds}:")
    common.print_table([{"what": k, "seconds": best[k], "gflops": flops[k] / 1e9} for k in best],
                       ["what", "seconds", "gflops"])
    return {"rollout_seconds": best["rollout"], "sampling_seconds": best["sampling"],
            "wall_ratio": best["rollout"] / best["sampling"], "flop_ratio": flops["rollout"] / flops["sampling"],
            "unet_forward_gflops": flops["unet"] / 1e9, "rounds": args.rounds}


def main(args) -> int:
    common.setup(args.threads)
    flops = flop_fractions(args)
    try:
        wall = wall_times(args)
    except ImportError as e:  # the inference stage is not there (yet)
        print(f"\nwall time on the tiny pipeline: not available ({e})")
        wall = None
    ratios = {"rollout_flops_vs_sampling[default RNN, SDXL 1024^2, 30 steps CFG]": flops["rollout_fraction"],
              "rollout_flops_vs_full_pipeline[+VAE decode, text encoders]": flops["rollout_fraction_of_full_pipeline"],
              "rollout_plus_text_encoding_flops_vs_sampling": flops["rollout_plus_text_fraction"],
              "unet_forward_tflops_vs_design_6.76": flops["unet_forward_tflops"] / common.SDXL_UNET_TFLOPS_1024}
    if wall:
        ratios["rollout_wall_time_vs_sampling[tiny pipeline]"] = wall["wall_ratio"]
        ratios["rollout_flops_vs_sampling[tiny pipeline]"] = wall["flop_ratio"]
    checks = {"rollout <= 1% of sampling FLOPs": flops["rollout_fraction"] <= 0.01,
              "SDXL UNet forward = 6.76 TFLOPs (+-1%)": abs(flops["unet_forward_tflops"] / 6.76 - 1) < 0.01}
    if wall:
        smaller = flops["unet_forward_tflops"] * 1e3 / wall["unet_forward_gflops"]
        print(f"note: the tiny pipeline's UNet needs {smaller:.1e} times fewer FLOPs than SDXL's, so its wall-time "
              "ratio shows how rollout time tracks FLOPs on this machine, not the SDXL ratio (the FLOP fraction above)")
    results = {"bench": "inference", "quick": args.quick, "flops": flops, "tiny_wall_time": wall, "ratios": ratios}
    return common.finish(results, args, checks)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
