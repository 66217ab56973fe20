#!/usr/bin/env python
"""Bench stage 2 (sequence-dataset generation) on a scaled-up tiny SDXL-architecture UNet, where compute dominates:
UNet evaluations per golden step (counted), the share of wall time inside UNet forwards, throughput at each
batch size relative to batch 1, and channels_last vs the default memory format; all measured side by side.

Also times a rerun's checks on a dataset of the quickstart's size: the staging files' sha256 (a resumed unsealed
range), sealing them into a shard, and the sealed shard's sha256.

    python bench/bench_generation.py            # full: batch 1, 2, 4, 8; 3 interleaved rounds; 26,400-sample scan
    python bench/bench_generation.py --quick    # seconds: a smaller UNet, one round, a 2,000-sample scan
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: E402  (bench/common.py; this script's folder is on sys.path)

import torch  # noqa: E402


def parse_args(argv=None):
    p = common.bench_args(__doc__)
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 2, 4, 8], help="prompts per UNet call to compare")
    p.add_argument("--num_prompts", type=int, default=None,
                   help="prompts per measured run (same for every batch size; default 16, quick 8)")
    p.add_argument("--num_steps", type=int, default=None, help="golden steps n per sequence (default 3, quick 2)")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds over all configs; the best round counts (default 3, quick 1)")
    p.add_argument("--block_out_channels", type=int, nargs="+", default=None,
                   help="UNet widths (default 64 128; quick 32 64): SDXL's architecture, scaled down")
    p.add_argument("--latent_size", type=int, default=32, help="latent height = width")
    p.add_argument("--channels_last_batch", type=int, default=4,
                   help="batch size of the channels_last and w_w=2 (both CFG branches) comparisons (0: skip)")
    p.add_argument("--scan_samples", type=int, default=None,
                   help="samples of the dataset whose resume checks are timed (default 26400, the quickstart's; "
                        "quick 2000; 0: skip)")
    args = p.parse_args(argv)
    q = args.quick
    args.scan_samples = (2000 if q else 26_400) if args.scan_samples is None else args.scan_samples
    args.num_prompts = args.num_prompts or (8 if q else 16)
    args.num_steps = args.num_steps or (2 if q else 3)
    args.rounds = args.rounds or (1 if q else 3)
    args.block_out_channels = tuple(args.block_out_channels or ((32, 64) if q else (64, 128)))
    if args.threads is None:
        args.threads = 1  # stable ratios on shared CPUs
    return args


def run_generation(pipe, prompts, settings, batch_size: int) -> dict:
    """One timed `generate_dataset` run into a fresh directory, with UNet forwards timed inside it."""
    from dataclasses import replace

    from golden_noise.dataset.generate import generate_dataset

    with tempfile.TemporaryDirectory() as out, common.UNetTimer(pipe.unet) as timer:
        t0 = time.perf_counter()
        stats = generate_dataset(pipe, prompts, out, replace(settings, batch_size=batch_size), progress=False)
        total = time.perf_counter() - t0
    steps = len(prompts) * settings.num_steps
    return {"seconds": total, "unet_seconds": timer.seconds, "unet_share": timer.seconds / total,
            "samples_per_s": len(prompts) / total, "evals_per_step_counter": stats["unet_evaluations_per_golden_step"],
            "evals_per_step_hook": timer.samples / steps, "unet_calls": timer.calls}


def measure_resume_scan(pipe, settings, num_samples: int) -> dict:
    """Seconds of a rerun's checks over a dataset of `num_samples` samples in batches of 64 (the quickstart's): every
    staging file's sha256 (dataset.generate.plan_work, what a resumed unsealed range costs), sealing them into one
    shard, and that shard's sha256 (check_sealed, what a rerun of a sealed range costs); and whether one flipped
    byte in a staging file is found."""
    from dataclasses import replace

    import numpy as np

    from golden_noise.dataset import format as F
    from golden_noise.dataset.generate import Sealer, check_sealed, generate_dataset, plan_work
    from golden_noise.dataset.shards import ShardFile
    from golden_noise.dataset.writer import SampleSpec, batch_bytes
    from golden_noise.io import atomic_write_bytes
    from golden_noise.prompts import Prompt

    batch = 64
    prompts = [Prompt(i, f"a shape number {i}") for i in range(num_samples)]
    settings = replace(settings, batch_size=batch)
    with tempfile.TemporaryDirectory() as out:
        root = Path(out)
        generate_dataset(pipe, prompts[:batch], root, settings, progress=False)  # the real arrays of one batch
        shard = ShardFile(F.shard_path(root, 0))
        groups = [shard.read_row_group(g, ("source", "golden", "text")) for g in range(shard.num_row_groups)]
        arrays = {k: torch.from_numpy(np.concatenate([g[k] for g in groups])) for k in groups[0]}
        run_config = {**F.read_run_config_json(root), "num_prompts": num_samples}  # the whole list's
        (root / F.INDEX).unlink()
        for b in range(-(-num_samples // batch)):  # the batch's arrays under every batch's ids
            ids = [p.index for p in prompts[b * batch:(b + 1) * batch]]
            atomic_write_bytes(F.batch_path(root, b), batch_bytes(ids, {k: v[:len(ids)] for k, v in arrays.items()}))
        spec, per_shard = SampleSpec.of(run_config), run_config["sharding"]["samples_per_shard"]
        staging = sum(p.stat().st_size for p in (root / F.STAGING).glob("batch-*.safetensors"))
        t0 = time.perf_counter()
        clean = plan_work(root, prompts, batch, [0], per_shard, spec, 0, 1)
        scan = time.perf_counter() - t0
        victim = F.batch_path(root, num_samples // batch // 2)
        data = bytearray(victim.read_bytes())
        data[-7] ^= 0x40
        victim.write_bytes(bytes(data))
        found = len(plan_work(root, prompts, batch, [0], per_shard, spec, 0, 1).batches) == 1
        atomic_write_bytes(victim, batch_bytes([p.index for p in prompts[num_samples // batch // 2 * batch:][:batch]],
                                               arrays))
        t0 = time.perf_counter()
        Sealer(root, prompts, run_config, [0]).finish()
        seal = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert check_sealed(root, [0], 0, 1) == []
        sha = time.perf_counter() - t0
        size = F.shard_path(root, 0).stat().st_size
    files = -(-num_samples // batch)
    print(f"resume checks of {num_samples} samples ({files} staging files): staging sha256 {scan:.2f}s, seal "
          f"{seal:.2f}s ({num_samples / seal:.0f} samples/s), shard sha256 {sha:.3f}s ({size / 1e6:.1f} MB); the one "
          f"flipped byte found: {found}")
    return {"samples": num_samples, "files": files, "scan_seconds": scan, "seal_seconds": seal,
            "shard_sha256_seconds": sha, "complete_found": clean.to_write == 0, "flipped_byte_found": found,
            "staging_bytes": staging, "shard_bytes": size}


def main(args) -> int:
    common.setup(args.threads)
    from golden_noise.diffusion import optimize_unet
    from golden_noise.golden import GoldenConfig
    from golden_noise.prompts import Prompt
    from golden_noise.dataset.generate import GenerationSettings

    size = args.latent_size
    pipe = common.tiny_pipeline(seed=0, sample_size=size, block_out_channels=args.block_out_channels)
    gflops = common.unet_forward_flops(pipe.unet, 1, (size, size), (size, size)) / 1e9
    print(f"UNet: SDXL architecture, block_out_channels {args.block_out_channels}, latents 4x{size}x{size}, "
          f"{sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.2f} M params, {gflops:.2f} GFLOPs per sample; "
          f"{torch.get_num_threads()} thread(s)")
    words = ["red", "green", "blue", "small", "large", "round", "square", "bright"]
    prompts = [Prompt(i, f"a {words[i % 8]} {words[(i * 3 + 1) % 8]} shape number {i}")
               for i in range(args.num_prompts)]

    def settings(n, w_l=5.5, w_w=1.0):
        return GenerationSettings(base_model_id="bench-scaled-tiny-sdxl", num_steps=n,
                                  golden=GoldenConfig(10, w_l, w_w), height=size, width=size)

    # 1. UNet evaluations per golden step, counted twice: GoldenStep's counter and a hook on unet.forward
    evals = {}
    for w_w in (0.0, 1.0, 2.0):
        r = run_generation(pipe, prompts[:2], settings(1, w_w=w_w), batch_size=2)
        evals[w_w] = r
        print(f"w_l=5.5, w_w={w_w:g}: {r['evals_per_step_counter']:g} UNet evaluations per golden step "
              f"(hook on unet.forward: {r['evals_per_step_hook']:g}, in {r['unet_calls']} UNet calls)")

    # 2. batch sizes, channels_last and both CFG branches in the inversion (w_w = 2: what evaluating every branch
    #    always would cost) side by side, interleaved over rounds; the best round per config counts
    cmp_b = args.channels_last_batch
    configs = [("contiguous", b, 1.0) for b in args.batch_sizes]
    if cmp_b:
        configs += [("contiguous", cmp_b, 1.0)] if cmp_b not in args.batch_sizes else []
        configs += [("channels_last", cmp_b, 1.0), ("contiguous", cmp_b, 2.0)]
    runs = {c: [] for c in configs}
    run_generation(pipe, prompts[:2], settings(1), batch_size=2)  # warm-up
    for _ in range(args.rounds):
        for fmt, b, w_w in configs:
            optimize_unet(pipe.unet, channels_last=fmt == "channels_last")
            runs[(fmt, b, w_w)].append(run_generation(pipe, prompts, settings(args.num_steps, w_w=w_w), batch_size=b))
            pipe.unet.to(memory_format=torch.contiguous_format)
    best = {c: max(rs, key=lambda r: r["samples_per_s"]) for c, rs in runs.items()}
    shares = {c: common.median([r["unet_share"] for r in rs]) for c, rs in runs.items()}
    base = best[("contiguous", args.batch_sizes[0], 1.0)]["samples_per_s"]
    rows = [{"batch": b, "memory_format": fmt, "w_w": w_w, "samples_per_s": best[c]["samples_per_s"],
             "vs_batch_1": best[c]["samples_per_s"] / base, "unet_share": shares[c],
             "evals_per_step": best[c]["evals_per_step_counter"]} for c in configs for fmt, b, w_w in [c]]
    common.print_table(rows, ["batch", "memory_format", "w_w", "samples_per_s", "vs_batch_1", "unet_share",
                              "evals_per_step"],
                       f"generate_dataset: {args.num_prompts} prompts, n={args.num_steps}, w_l=5.5, best of "
                       f"{args.rounds} round(s) (share: median)")

    ratios = {f"unet_evaluations_per_golden_step[w_w={w:g}]": r["evals_per_step_counter"] for w, r in evals.items()}
    ratios.update({f"unet_share_of_wall_time[batch={b}]": shares[("contiguous", b, 1.0)] for b in args.batch_sizes})
    ratios.update({f"throughput_vs_batch_1[batch={b}]": best[("contiguous", b, 1.0)]["samples_per_s"] / base
                   for b in args.batch_sizes})
    if cmp_b:
        ref = best[("contiguous", cmp_b, 1.0)]["samples_per_s"]
        cl = best[("channels_last", cmp_b, 1.0)]["samples_per_s"]
        ratios[f"channels_last_vs_contiguous[batch={cmp_b}]"] = cl / ref
        ratios[f"needed_branches_only_speedup[batch={cmp_b}, w_w=1 vs 2]"] = \
            ref / best[("contiguous", cmp_b, 2.0)]["samples_per_s"]
    checks = {"3 UNet evaluations per golden step with w_w in {0, 1}":
              all(evals[w]["evals_per_step_counter"] == 3 == evals[w]["evals_per_step_hook"] for w in (0.0, 1.0)),
              "4 UNet evaluations per golden step with w_w = 2": evals[2.0]["evals_per_step_counter"] == 4,
              ">= 90% of wall time in UNet forwards at batch >= 4":
              all(shares[("contiguous", b, 1.0)] >= 0.9 for b in args.batch_sizes if b >= 4)}
    if args.scan_samples:
        scan = measure_resume_scan(pipe, settings(1), args.scan_samples)
        ratios[f"resume_scan_seconds[{scan['samples']} samples]"] = scan["scan_seconds"]
        ratios[f"seal_seconds[{scan['samples']} samples]"] = scan["seal_seconds"]
        ratios["staging_check_GB_s"] = scan["staging_bytes"] / 1e9 / scan["scan_seconds"]
        ratios["shard_sha256_GB_s"] = scan["shard_bytes"] / 1e9 / scan["shard_sha256_seconds"]
        checks[f"resume checks of {scan['samples']} samples: every staging file intact, one flipped byte found"] = \
            scan["flipped_byte_found"] and scan["complete_found"]
    results = {"bench": "generation", "quick": args.quick, "unet": {
        "block_out_channels": list(args.block_out_channels), "latent_size": size, "gflops_per_sample": gflops},
        "num_prompts": args.num_prompts, "num_steps": args.num_steps, "rounds": args.rounds, "rows": rows,
        "ratios": ratios, "resume_scan": scan if args.scan_samples else None}
    return common.finish(results, args, checks)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
