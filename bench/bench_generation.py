#!/usr/bin/env python
"""Bench stage 2 (sequence-dataset generation) on a scaled-up tiny SDXL-architecture UNet, where compute dominates:
UNet evaluations per golden step (counted), the share of wall time inside UNet forwards, throughput at each
batch size relative to batch 1, and channels_last vs the default memory format; all measured side by side.

Also times the resume scan (every sample file of a finished dataset checked for truncation, as a rerun does)
on a dataset of the quickstart's size.

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
                   help="samples of the dataset whose resume scan is timed (default 26400, the quickstart's; "
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
    from golden_noise.npd import generate_dataset

    with tempfile.TemporaryDirectory() as out, common.UNetTimer(pipe.unet) as timer:
        t0 = time.perf_counter()
        stats = generate_dataset(pipe, prompts, out, settings, batch_size=batch_size, progress=False)
        total = time.perf_counter() - t0
    steps = len(prompts) * settings.num_steps
    return {"seconds": total, "unet_seconds": timer.seconds, "unet_share": timer.seconds / total,
            "samples_per_s": len(prompts) / total, "evals_per_step_counter": stats["unet_evaluations_per_golden_step"],
            "evals_per_step_hook": timer.samples / steps, "unet_calls": timer.calls}


def measure_resume_scan(pipe, settings, num_samples: int) -> dict:
    """Seconds of stage 2's resume scan (npd.plan_work) and of its metadata scan over a finished dataset of
    `num_samples` samples, and whether the scan finds one truncated file among them."""
    from golden_noise import layout
    from golden_noise.npd import generate_dataset, plan_work, write_metadata
    from golden_noise.prompts import Prompt

    prompts = [Prompt(i, f"a shape number {i}") for i in range(num_samples)]
    with tempfile.TemporaryDirectory() as out:
        root = Path(out)
        generate_dataset(pipe, prompts[:4], root, settings, batch_size=4, progress=False)
        # the 4 real samples' bytes under every id: the scan reads each file's size and last bytes only
        blobs = {(i, c): (root / rel).read_bytes() for i in range(4) for c, rel in layout.sample_files(i).items()}
        for sid in range(4, num_samples):
            for c, rel in layout.sample_files(sid).items():
                (root / rel).write_bytes(blobs[(sid % 4, c)])
        t0 = time.perf_counter()
        clean = plan_work(root, prompts, 8, 0, 1, False)
        scan = time.perf_counter() - t0
        t0 = time.perf_counter()
        rows = write_metadata(root, prompts, settings)
        metadata = time.perf_counter() - t0
        victim = layout.sample_files(num_samples // 2)["golden_sequence_file"]
        (root / victim).write_bytes((root / victim).read_bytes()[:300])
        truncated_found = plan_work(root, prompts, 8, 0, 1, False).damaged == [victim]
    files = 3 * num_samples
    print(f"resume scan of {num_samples} samples ({files} files): {scan:.2f}s ({1e6 * scan / files:.1f} us per "
          f"file); metadata scan {metadata:.2f}s; the one truncated file found: {truncated_found}")
    return {"samples": num_samples, "files": files, "scan_seconds": scan, "metadata_seconds": metadata,
            "complete_found": len(clean.ids) == num_samples and clean.to_write == 0 and rows == num_samples,
            "truncated_found": truncated_found}


def main(args) -> int:
    common.setup(args.threads)
    from golden_noise.diffusion import optimize_unet
    from golden_noise.golden import GoldenConfig
    from golden_noise.prompts import Prompt
    from golden_noise.npd import GenerationSettings

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
        checks[f"resume scan of {scan['samples']} samples under 3 s, one truncated file found"] = \
            scan["scan_seconds"] < 3 and scan["truncated_found"] and scan["complete_found"]
    results = {"bench": "generation", "quick": args.quick, "unet": {
        "block_out_channels": list(args.block_out_channels), "latent_size": size, "gflops_per_sample": gflops},
        "num_prompts": args.num_prompts, "num_steps": args.num_steps, "rounds": args.rounds, "rows": rows,
        "ratios": ratios, "resume_scan": scan if args.scan_samples else None}
    return common.finish(results, args, checks)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
