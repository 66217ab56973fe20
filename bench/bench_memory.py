#!/usr/bin/env python
"""Bench memory: peak RSS (and torch.cuda.max_memory_allocated where a GPU exists) of each stage, each run
through its own CLI in a fresh process on a tiny pipeline, next to a process that only imports the libraries.

    python bench/bench_memory.py            # a scaled-up tiny UNet (latents 4x32x32), more prompts and steps
    python bench/bench_memory.py --quick    # the tiny pipeline (latents 4x16x16), a few prompts
"""
from __future__ import annotations

import json
import os
import resource
import runpy
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common  # noqa: E402  (bench/common.py; this script's folder is on sys.path)

MARK = "BENCH_MEMORY_RESULT "


def child(argv: list[str]) -> int:
    """Run one stage CLI (or only the imports) in this process, then print its peak memory as one JSON line."""
    code = 0
    if argv[0] == "imports":
        import diffusers  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    else:
        sys.argv = argv
        try:
            runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    import torch

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() and torch.cuda.is_initialized() \
        else None
    print(MARK + json.dumps({"exit_code": code, "peak_rss_mib": kib / 1024, "cuda_max_allocated_mib": cuda}),
          flush=True)
    return 0


def parse_args(argv=None):
    p = common.bench_args(__doc__)
    p.add_argument("--device", default="cpu", help="device of every stage: cpu, or cuda to get GPU memory too")
    args = p.parse_args(argv)
    if args.threads is None:
        args.threads = 1
    return args


def run_stage(name: str, argv: list[str], env: dict) -> dict:
    """Run `argv` through `child` in a fresh interpreter; return its memory figures (or why it failed)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", *map(str, argv)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(common.ROOT), timeout=1800)
    seconds = time.perf_counter() - t0
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if not lines:
        return {"stage": name, "available": False, "why": _last_error(proc), "seconds": seconds}
    result = {"stage": name, "seconds": seconds, **json.loads(lines[-1][len(MARK):])}
    result["available"] = result["exit_code"] == 0
    if not result["available"]:
        result["why"] = _last_error(proc)
    return result


def _last_error(proc) -> str:
    lines = [line for line in (proc.stderr + proc.stdout).strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:") or "Error" in line]
    return (errors or lines or [f"exit code {proc.returncode}"])[-1][:300]


def main(args) -> int:
    common.setup(args.threads)
    from golden_noise.testing.pipelines import save_tiny_sdxl_pipeline

    q = args.quick
    n_prompts, n_steps, size = (4, 2, 16) if q else (16, 10, 32)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": os.pathsep.join(
               [str(common.ROOT / "src"), str(common.ROOT), os.environ.get("PYTHONPATH", "")])}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pipe_dir = save_tiny_sdxl_pipeline(tmp / "pipe", seed=0, sample_size=size,
                                           **({} if q else {"block_out_channels": (64, 128)}))
        prompts = tmp / "prompts.txt"
        prompts.write_text("".join(f"a small red shape number {i}\n" for i in range(n_prompts)), encoding="utf-8")
        ds, run, images = tmp / "ds", tmp / "run", tmp / "images"
        dev = ["--device", args.device]
        generation = ["src/generate_npd_series.py", "--prompt_file", prompts, "--output_dir", ds, "--base_model_id",
                      pipe_dir, "--num_steps", n_steps, "--batch_size", 4, *dev]
        training = ["src/train_rnn_model_v3.py", "--dataset_dir", ds, "--output_dir", run, "--max_train_steps",
                    2 if q else 10, "--batch_size", 2 if q else 8, "--validation_fraction", 0.25, "--report_to", "none",
                    "--save_steps", 1000, "--dataloader_num_workers", 0 if q else 2]
        single = ["src/inference_rnn.py", "--rnn_weights_path", run, "--prompt", "a small red shape",
                  "--base_model_id", pipe_dir, "--num_inference_steps", 5 if q else 30, "--output_dir", images / "one",
                  "--generate_standard", *dev]
        batch = ["scripts/batch_inference.py", "--prompt_file", prompts, "--output_base_dir", images / "batch",
                 "--rnn_weights_path", run, "--base_model_id", pipe_dir, "--methods", "standard", "gnsnet",
                 "--num_inference_steps", 5 if q else 30, "--batch_size", 4, *dev]
        # stages that do not depend on each other run at the same time (peak RSS is per process)
        with ThreadPoolExecutor(max_workers=2) as pool:
            phases = [[("imports only (baseline)", ["imports"]), ("2 generation", generation)],
                      [("3 training (default model config)", training)],
                      [("4 inference (one prompt)", single), ("5 batch inference", batch)]]
            for phase in phases:
                results += list(pool.map(lambda s: run_stage(s[0], s[1], env), phase))
    base = results[0].get("peak_rss_mib") if results[0]["available"] else None
    rows = []
    for r in results:
        rows.append({"stage": r["stage"], "peak_rss_mib": r.get("peak_rss_mib"),
                     "above_imports_mib": (r["peak_rss_mib"] - base) if base and r["available"] else None,
                     "seconds": r["seconds"],
                     "cuda_max_allocated_mib": r.get("cuda_max_allocated_mib"),
                     "status": "ok" if r["available"] else f"not available: {r['why']}"})
    common.print_table(rows, ["stage", "peak_rss_mib", "above_imports_mib", "seconds",
                              "cuda_max_allocated_mib", "status"],
                       f"peak memory per stage ({'tiny' if q else 'scaled-up tiny'} pipeline, latents 4x{size}x{size}, "
                       f"{n_prompts} prompts, n={n_steps}, device {args.device})")
    ratios = {f"peak_rss_vs_imports[{r['stage']}]": r["peak_rss_mib"] / base
              for r in results[1:] if base and r["available"]}
    out = {"bench": "memory", "quick": q, "latent_size": size, "num_prompts": n_prompts, "num_steps": n_steps,
           "stages": rows, "ratios": ratios}
    return common.finish(out, args)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        sys.exit(child(sys.argv[2:]))
    sys.exit(main(parse_args()))
