#!/usr/bin/env python
"""Bench the sequence dataset's formats at SDXL size (latents 4x128x128, n = 10, 1280-d text, float16): files and
bytes per sample (loose files vs shards), the training loader's samples/s with 0/2/4 workers against the rate a GPU
trains at (headroom), and how fast the integrity checks read (sha256 of shards, CRC of loose files).

    python bench/bench_dataset.py            # 64 SDXL-size samples, workers 0 2 4
    python bench/bench_dataset.py --quick    # seconds: 16 samples of 4x64x64
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: E402  (bench/common.py; this script's folder is on sys.path)

GPU_CHECK = common.ROOT / "docs/gpu/gpu_check_h200.json"  # the RNN training step measured on one H200
H100_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H100 SXM datasheet, dense BF16 tensor-core peak
ASSUMED_MFU = 0.4               # model FLOP utilisation assumed for the FLOP-based estimate
PRODUCTION_SAMPLES = 100_000    # NPNet's dataset size, for the file counts at scale


def parse_args(argv=None):
    p = common.bench_args(__doc__.split("\n")[0])
    p.add_argument("--num_samples", type=int, default=None, help="samples of the dataset (default 64, quick 16)")
    p.add_argument("--latent_size", type=int, default=None, help="latent height = width (default 128, quick 64)")
    p.add_argument("--num_steps", type=int, default=10, help="n: golden steps per sequence")
    p.add_argument("--text_dim", type=int, default=1280, help="text embedding size")
    p.add_argument("--batch_size", type=int, default=8, help="samples per loader batch (the GPU check's batch)")
    p.add_argument("--num_workers", type=int, nargs="+", default=[0, 2, 4], help="loader worker counts")
    p.add_argument("--epochs", type=int, default=None, help="timed passes over the dataset (default 3, quick 2)")
    args = p.parse_args(argv)
    args.num_samples = args.num_samples or (16 if args.quick else 64)
    args.latent_size = args.latent_size or (64 if args.quick else 128)
    args.epochs = args.epochs or (2 if args.quick else 3)
    if args.threads is None:
        args.threads = 1
    return args


def footprint(root: Path, data_files: list[Path], n: int) -> dict:
    """Files and bytes per sample: the data files' logical size and their allocated blocks (what a filesystem
    holds), and the whole folder's file count."""
    every = [p for p in root.rglob("*") if p.is_file()]
    return {"data_files": len(data_files), "all_files": len(every), "files_per_sample": len(data_files) / n,
            "bytes_per_sample": sum(p.stat().st_size for p in data_files) / n,
            "allocated_per_sample": sum(p.stat().st_blocks * 512 for p in data_files) / n}


def cpu_ms_per_sample(dataset, batch_size: int, samples: int) -> float:
    """CPU milliseconds (process time: what other load on the machine does not inflate) per sample of the
    training loader's work, done in this process: read, check, convert, collate, in the trainer's order."""
    from golden_noise.dataset.reader import collate
    from golden_noise.training.core import EpochSampler

    order, done = list(EpochSampler(len(dataset), 42)), 0
    collate([dataset[i] for i in order[:batch_size]])  # warm-up
    t0 = time.process_time()
    while done < samples:
        for start in range(0, len(order), batch_size):
            collate([dataset[i] for i in order[start:start + batch_size]])
            done += len(order[start:start + batch_size])
    return 1000 * (time.process_time() - t0) / done


def gpu_rates() -> dict:
    """The default RNN's measured training rates (sequences/s, batch 8, n = 10, 128x128 latents) on one H200."""
    rows = json.loads(GPU_CHECK.read_text())["sections"]["RNN training step"]["rows"]
    return {f"h200_{'bf16' if r['mixed_precision'] == 'bf16' else 'fp32'}": r["sequences_per_s"] for r in rows}


def main(argv=None) -> int:
    args = parse_args(argv)
    common.setup(args.threads)
    from golden_noise.dataset import format as F
    from golden_noise.dataset.convert import convert_dataset
    from golden_noise.dataset.reader import loose_file_problem, expected_bytes, open_dataset, read_metadata
    from golden_noise.dataset.shards import verify_shards

    size, n = args.latent_size, args.num_samples
    shape = (4, size, size)
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_training import sdxl_flops

    flops = sdxl_flops(args.num_steps)
    targets = {**gpu_rates(), "flop_estimate": ASSUMED_MFU * H100_BF16_DENSE_TFLOPS / flops["train_tflops_per_sample"]}
    results: dict = {"args": vars(args), "train_rates": targets}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMPDIR")) as tmp:
        loose = common.write_loose_dataset(Path(tmp) / "loose", n, args.num_steps, shape, args.text_dim,
                                           args.batch_size)
        t0 = time.perf_counter()
        convert_dataset(loose, Path(tmp) / "sharded")
        convert_s = time.perf_counter() - t0
        sharded = Path(tmp) / "sharded"
        run_config = F.read_run_config_json(sharded)
        per_shard = run_config["sharding"]["samples_per_shard"]
        sizes = {"loose (format 1)": footprint(loose, list((loose / F.SEQUENCES).iterdir()), n),
                 "shards (format 2)": footprint(sharded, list((sharded / F.DATA).iterdir()), n)}
        sizes["loose (format 1)"]["files_at_100k"] = 3 * PRODUCTION_SAMPLES + 2
        sizes["shards (format 2)"]["files_at_100k"] = math.ceil(PRODUCTION_SAMPLES / per_shard) + 4
        rows = [{"format": k, **v} for k, v in sizes.items()]
        common.print_table(rows, ["format", "files_per_sample", "bytes_per_sample", "allocated_per_sample",
                                  "all_files", "files_at_100k"],
                           f"{n} samples of {shape[0]}x{size}x{size}, n = {args.num_steps}, float16 "
                           f"({per_shard} samples per shard, {run_config['sharding']['rows_per_group']} per row "
                           "group)")
        results["footprint"] = rows

        # integrity checks: how fast they read (the files are in the page cache: CPU-bound figures)
        index = F.read_index(sharded)
        t0 = time.perf_counter()
        assert not verify_shards(sharded, index["shards"])
        sha_s = time.perf_counter() - t0
        need = expected_bytes(run_config)
        rows_v1 = read_metadata(loose, args.num_steps)
        t0 = time.perf_counter()
        assert not any(loose_file_problem(p, need[k]) for r in rows_v1 for k, p in r.files().items())
        crc_s = time.perf_counter() - t0
        gb_v2, gb_v1 = index["bytes"] / 1e9, sum(p.stat().st_size for p in (loose / F.SEQUENCES).iterdir()) / 1e9
        checks_row = {"shard_sha256_GB_s": gb_v2 / sha_s, "loose_crc_GB_s": gb_v1 / crc_s,
                      "shard_sha256_s_per_GB": sha_s / gb_v2, "convert_samples_s": n / convert_s}
        common.print_table([checks_row], list(checks_row), "integrity checks before training, and conversion")
        results["integrity"] = checks_row

        loaders, cpu = [], []
        for fmt, root, kw in (("shards", sharded, {"cache_bytes": 0}), ("loose", loose, {})):
            # as the trainer reads: the storage dtype (converted on its device); cache 0: every sample decodes
            data = open_dataset(root, validation_fraction=0.0, keep_dtype=True, **kw).train
            ms = cpu_ms_per_sample(data, args.batch_size, args.epochs * n)
            cpu.append({"format": fmt, "cpu_ms_per_sample": ms, "samples_per_cpu_s": 1000 / ms,
                        "two_cores_vs_h200_bf16": 2000 / ms / targets["h200_bf16"]})
            for w in args.num_workers:
                rate = common.loader_rate(data, args.batch_size, w, args.epochs * n)
                loaders.append({"format": fmt, "workers": w, "loader_samples_s": rate,
                                **{f"headroom_vs_{k}": rate / v for k, v in targets.items()}})
        common.print_table(cpu, ["format", "cpu_ms_per_sample", "samples_per_cpu_s", "two_cores_vs_h200_bf16"],
                           "the loader's CPU cost per sample (process time: read, check, convert, collate; "
                           "insensitive to other load)")
        common.print_table(loaders, ["format", "workers", "loader_samples_s", *[f"headroom_vs_{k}" for k in targets]],
                           f"training loader, wall clock (batch {args.batch_size}, the trainer's sampler and collate) "
                           f"vs training rates {', '.join(f'{k} {v:.1f}/s' for k, v in targets.items())}; load "
                           f"average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        results["loader"], results["loader_cpu"] = loaders, cpu
    ratios = {f"{r['format']}_loader_headroom_vs_h200_bf16[workers={r['workers']}]": r["headroom_vs_h200_bf16"]
              for r in loaders}
    ratios.update({f"{r['format']}_two_cores_of_cpu_work_vs_h200_bf16": r["two_cores_vs_h200_bf16"] for r in cpu})
    ratios.update({"files_per_sample[loose]": sizes["loose (format 1)"]["files_per_sample"],
                   "files_per_sample[shards]": sizes["shards (format 2)"]["files_per_sample"],
                   "bytes_per_sample[loose]": sizes["loose (format 1)"]["bytes_per_sample"],
                   "bytes_per_sample[shards]": sizes["shards (format 2)"]["bytes_per_sample"],
                   "shard_sha256_seconds_per_GB": checks_row["shard_sha256_s_per_GB"]})
    results["ratios"] = ratios
    two = [r for r in loaders if r["format"] == "shards" and r["workers"] == 2]
    checks = {}
    if not args.quick:
        checks["2 cores of the sharded loader's CPU work >= 3x the H200's bf16 training rate"] = \
            cpu[0]["two_cores_vs_h200_bf16"] >= 3
        if two:
            checks["sharded loader with 2 workers >= 3x the H200's bf16 training rate (wall clock)"] = \
                two[0]["headroom_vs_h200_bf16"] >= 3
    checks["100k samples fit the Hub's 10k files per folder (shards)"] = \
        sizes["shards (format 2)"]["files_at_100k"] <= 10_000
    return common.finish(results, args, checks)


if __name__ == "__main__":
    sys.exit(main())
