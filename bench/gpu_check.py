#!/usr/bin/env python
"""GPU check (H100): a full-size SDXL-architecture UNet and VAE with random weights from the public configs
(timing does not depend on weight values), driven by the project's own `GoldenStep`, at 1024^2.

Reports golden steps/s and sequences/hour at n = 10 for batch sizes 1-16 in fp16 and bf16, the share of time
in UNet forwards, peak memory, the effect of channels_last and torch.compile, the VAE decode, the RNN rollout
vs a 30-step sampling, and the training step time of the default NoiseSequenceRNN_v3 at 128x128 latents.
Goal: >= 1,500 sequences/hour at n = 10 on one H100. Run it through `bench/gpu_check.sh` (installs diffusers
from carried wheels when missing); `--device cpu --tiny` runs every section on tiny sizes as a dry run.
Figures are written to --json after every section, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import common  # noqa: E402  (bench/common.py; this script's folder is on sys.path)

import torch  # noqa: E402

from golden_noise.cli import finite_float  # noqa: E402  (NaN and infinities are refused)

# --tiny: the same architectures, scaled down so a CPU runs every section in seconds
TINY_UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1), attention_head_dim=(2, 4), cross_attention_dim=64,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80, norm_num_groups=8)
TINY_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                       norm_num_groups=4, sample_size=16)
TINY_RNN = dict(text_proj_dim=16, cnn_base_filters=8, cnn_num_blocks=[1, 1], cnn_feat_dim=16, gru_hidden_size=16,
                gru_num_layers=1, norm_groups=4)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def parse_args(argv=None):
    from golden_noise.cli import parser

    p = parser(__doc__)  # the docstring's first paragraph, as every CLI's
    p.add_argument("--device", default="cuda", help="cuda (the check) or cpu (with --tiny: a dry run)")
    p.add_argument("--tiny", action="store_true", help="tiny UNet/VAE/RNN and latents 8x8: a dry run of every section")
    p.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"], choices=list(DTYPES),
                   help="UNet dtypes to sweep; the first is used for the channels_last/compile/VAE sections")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="prompts per golden step")
    p.add_argument("--resolution", type=int, default=1024, help="image size in px (latents: resolution / 8)")
    p.add_argument("--num_steps", type=int, default=10, help="n: golden steps per sequence")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (after one warm-up call)")
    p.add_argument("--compare_batch", type=int, default=8, help="batch size of the channels_last/compile comparison")
    p.add_argument("--num_inference_steps", type=int, default=30, help="sampling steps the rollout is compared with")
    p.add_argument("--train_batch_size", type=int, default=8, help="sequences per RNN training step")
    p.add_argument("--compile_backend", default="inductor", help="torch.compile backend ('none' skips the section)")
    p.add_argument("--compile_mode", default=None, help="torch.compile mode (default, reduce-overhead, max-autotune)")
    p.add_argument("--min_compile_budget_s", type=finite_float, default=150.0,
                   help="skip torch.compile when less than this much of the time budget is left")
    p.add_argument("--time_budget_s", type=finite_float, default=390.0,
                   help="sections that would start after this many seconds are skipped")
    p.add_argument("--json", default=None, help="write the figures here (after every section)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 with --device cpu, for stable timings on shared CPUs)")
    args = p.parse_args(argv)
    if args.threads is None and torch.device(args.device).type == "cpu":
        args.threads = 1
    if args.tiny:
        args.resolution = 64
    return args


def first_line(e: BaseException) -> str:
    """'Type: first line of the message', for reports."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


class Check:
    """Runs the sections in order within the time budget, records their figures, and saves them as it goes."""

    def __init__(self, args):
        self.args = args
        self.start = time.perf_counter()
        self.device = torch.device(args.device)
        self.results = {"args": vars(args), "environment": common.environment(), "sections": {}, "skipped": {}}
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            self.results["environment"]["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        self.results["environment"]["diffusers_from"] = __import__("diffusers").__file__

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def run(self, name: str, fn, min_left_s: float = 0.0):
        left = self.args.time_budget_s - self.elapsed()
        if left < max(min_left_s, 1.0):
            print(f"\n== {name}: skipped ({left:.0f}s of the time budget left)", flush=True)
            self.results["skipped"][name] = f"time budget ({left:.0f}s left)"
            return None
        print(f"\n== {name} (at {self.elapsed():.0f}s)", flush=True)
        t0 = time.perf_counter()
        try:
            out = fn()
        except Exception as e:  # report and go on: one failing section must not cost the others
            traceback.print_exc()
            out = {"error": first_line(e)}
            print(f"   FAILED: {out['error']}", flush=True)
        finally:
            self.free()
        if out is not None:
            out["section_seconds"] = round(time.perf_counter() - t0, 2)
            self.results["sections"][name] = out
        self.save()
        return out

    def free(self) -> None:
        import gc

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def save(self) -> None:
        self.results["elapsed_s"] = round(self.elapsed(), 1)
        if self.args.json:
            Path(self.args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(self.args.json).write_text(json.dumps(self.results, indent=2, default=str) + "\n", encoding="utf-8")

    # ---- measurement helpers ----------------------------------------------------------------------------
    def sync(self) -> None:
        common.sync(self.device)

    def seconds_per_call(self, fn, repeats: int | None = None) -> float:
        """Wall seconds of one `fn()`, after one warm-up call, averaged over `repeats` calls."""
        fn()
        self.sync()
        t0 = time.perf_counter()
        for _ in range(repeats or self.args.repeats):
            fn()
        self.sync()
        return (time.perf_counter() - t0) / (repeats or self.args.repeats)

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        if self.device.type != "cuda":
            return None
        self.sync()
        return round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)


def record_unet_calls(unet, fn) -> list:
    """The (args, kwargs) of every UNet forward that `fn()` makes, to replay the same calls alone."""
    calls = []
    inner = unet.forward

    def recording(*a, **k):
        calls.append((a, k))
        return inner(*a, **k)

    unet.forward = recording
    try:
        fn()
    finally:
        del unet.forward
    return calls


def sdxl_golden_step(unet):
    """The project's SDXL golden step (NPNet's defaults) on a bare UNet: the SDXL family's guided prediction and
    SDXL's scheduler config, as golden.golden_step builds it from a loaded pipeline."""
    from types import SimpleNamespace

    from golden_noise.diffusion import SDXLFamily, sdxl_scheduler_config
    from golden_noise.golden import GoldenConfig, GoldenStep

    return GoldenStep(SDXLFamily(SimpleNamespace(unet=unet)).predict, sdxl_scheduler_config(), GoldenConfig())


def golden_step_figures(check: Check, unet, batch: int, n: int, share: bool = True) -> dict:
    """Time GoldenStep at `batch` and (with `share`) the same UNet calls alone; derive steps/s, sequences/hour
    and the UNet's share of the step time."""
    a = check.args
    lat = a.resolution // 8
    step = sdxl_golden_step(unet)
    g = torch.Generator("cpu").manual_seed(batch)
    x = torch.randn(batch, unet.config.in_channels, lat, lat, generator=g).to(check.device)  # (B, C, h, w) float32
    cond = common.random_conditioning(unet, batch, a.resolution, a.resolution, device=check.device)
    check.reset_peak()
    t_step = check.seconds_per_call(lambda: step(x, cond))
    peak = check.peak_gib()
    evals = step.counter.rows / ((a.repeats + 1) * batch)
    t_unet = None
    if share:  # (not under torch.compile: the recording wrapper would force a recompilation)
        calls = record_unet_calls(unet, lambda: step(x, cond))

        def unet_only():
            with torch.no_grad():
                for args, kwargs in calls:
                    unet(*args, **kwargs)

        t_unet = check.seconds_per_call(unet_only)
    steps_per_s = batch / t_step  # per-sample golden steps per second
    return {"batch": batch, "seconds_per_step": t_step, "golden_steps_per_s": steps_per_s,
            "sequences_per_hour": 3600 * steps_per_s / n, "unet_share": min(1.0, t_unet / t_step) if t_unet else None,
            "unet_evals_per_step": evals, "peak_gib": peak,
            "achieved_tflops": evals * batch * check.results.get("unet_flops", 0) / t_step / 1e12}


def print_rows(rows, columns, title=None):
    common.print_table(rows, columns, title)
    sys.stdout.flush()


def main(args) -> int:
    common.setup(args.threads)
    from golden_noise.diffusion import optimize_unet

    check = Check(args)
    tiny = args.tiny
    lat = args.resolution // 8
    unet_cfg = TINY_UNET_CONFIG if tiny else common.SDXL_UNET_CONFIG
    vae_cfg = TINY_VAE_CONFIG if tiny else common.SDXL_VAE_CONFIG
    dtype0 = DTYPES[args.dtypes[0]]
    env = check.results["environment"]
    print(f"device {args.device} ({env.get('cuda') or 'cpu'}), torch {env['torch']}, diffusers {env.get('diffusers')}, "
          f"resolution {args.resolution} (latents 4x{lat}x{lat}), n={args.num_steps}, budget {args.time_budget_s:.0f}s")

    def flops():
        unet = common.build_sdxl_unet(unet_cfg, device="meta")
        f = common.unet_forward_flops(unet, 1, (lat, lat), (args.resolution, args.resolution))
        vae = common.build_sdxl_vae(vae_cfg, device="meta")
        with torch.no_grad():
            fv = common.count_flops(vae.decode, torch.empty(1, 4, lat, lat, device="meta"))
        check.results["unet_flops"] = f
        print(f"   UNet forward {f / 1e12:.3f} TFLOPs per sample (SDXL at 1024^2: {common.SDXL_UNET_TFLOPS_1024}), "
              f"{sum(p.numel() for p in unet.parameters()) / 1e9:.3f} B params; VAE decode {fv / 1e12:.2f} TFLOPs")
        return {"unet_tflops_per_forward": f / 1e12, "vae_decode_tflops": fv / 1e12,
                "unet_params": sum(p.numel() for p in unet.parameters())}

    check.run("flops (meta device)", flops)

    state = {}

    def build():
        t0 = time.perf_counter()
        state["unet"] = common.build_sdxl_unet(unet_cfg, device=check.device, dtype=dtype0)
        check.sync()
        return {"seconds": time.perf_counter() - t0, "dtype": args.dtypes[0]}

    check.run("build UNet (random weights, on the device)", build)
    if "unet" not in state:
        return 1
    unet = state["unet"]

    sweeps = {}
    for name in args.dtypes:
        def sweep(name=name):
            unet.to(DTYPES[name])
            rows = []
            for b in args.batch_sizes:
                try:
                    rows.append(golden_step_figures(check, unet, b, args.num_steps))
                except torch.cuda.OutOfMemoryError:
                    rows.append({"batch": b, "error": "out of memory"})
                    check.free()
            print_rows(rows, ["batch", "seconds_per_step", "golden_steps_per_s", "sequences_per_hour", "unet_share",
                              "unet_evals_per_step", "peak_gib", "achieved_tflops"],
                       f"   golden step, {name}, n={args.num_steps}:")
            ok = [r for r in rows if "error" not in r]
            best = max(ok, key=lambda r: r["sequences_per_hour"]) if ok else None
            sweeps[name] = best
            return {"rows": rows, "best": best}

        check.run(f"golden step sweep {name}", sweep)
    unet.to(dtype0)
    best0 = sweeps.get(args.dtypes[0])

    def sequence():
        b = best0["batch"] if best0 else args.batch_sizes[0]
        step = sdxl_golden_step(unet)
        x = torch.randn(b, 4, lat, lat, generator=torch.Generator().manual_seed(0)).to(check.device)
        cond = common.random_conditioning(unet, b, args.resolution, args.resolution, device=check.device)
        check.sync()
        t0 = time.perf_counter()
        seq = step.sequence(x, cond, args.num_steps)  # (B, n, C, h, w)
        check.sync()
        t = time.perf_counter() - t0
        rel = ((seq[:, 0] - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)).mean().item()
        print(f"   GoldenStep.sequence, batch {b}, n={args.num_steps}: {t:.2f}s -> {3600 * b / t:.0f} sequences/hour "
              f"(outputs finite: {bool(torch.isfinite(seq).all())}, ||x'_1 - x_T|| / ||x_T|| = {rel:.3f})")
        return {"batch": b, "seconds": t, "sequences_per_hour": 3600 * b / t, "finite": bool(torch.isfinite(seq).all()),
                "relative_change_step1": rel}

    check.run(f"measured sequence {args.dtypes[0]}", sequence)

    cmp_batch = min(args.compare_batch, max(args.batch_sizes))
    base = {}

    def channels_last():
        base["contiguous"] = golden_step_figures(check, unet, cmp_batch, args.num_steps)
        optimize_unet(unet, channels_last=True)
        try:
            cl = golden_step_figures(check, unet, cmp_batch, args.num_steps)
        finally:
            unet.to(memory_format=torch.contiguous_format)
        base["channels_last"] = cl
        ratio = base["contiguous"]["seconds_per_step"] / cl["seconds_per_step"]
        print(f"   batch {cmp_batch}: channels_last {cl['sequences_per_hour']:.0f} vs contiguous "
              f"{base['contiguous']['sequences_per_hour']:.0f} sequences/hour: speed-up x{ratio:.3f}")
        return {"batch": cmp_batch, "contiguous": base["contiguous"], "channels_last": cl, "speedup": ratio}

    check.run("channels_last", channels_last)

    def vae_and_sampling():
        vae = common.build_sdxl_vae(vae_cfg, device=check.device, dtype=dtype0)
        z = torch.randn(1, 4, lat, lat).to(check.device, dtype0)
        check.reset_peak()
        with torch.no_grad():
            t_vae = check.seconds_per_call(lambda: vae.decode(z, return_dict=False))
        peak_vae = check.peak_gib()
        del vae
        check.free()
        cond = common.random_conditioning(unet, 1, args.resolution, args.resolution, device=check.device)
        x2 = torch.randn(2, 4, lat, lat).to(check.device, dtype0)
        kw = {"encoder_hidden_states": torch.cat([cond.uncond_embeds, cond.cond_embeds]),
              "added_cond_kwargs": {"text_embeds": torch.cat([cond.uncond_pooled, cond.cond_pooled]),
                                    "time_ids": torch.cat([cond.time_ids, cond.time_ids])}}
        with torch.no_grad():
            t_cfg = check.seconds_per_call(lambda: unet(x2, 901, **kw, return_dict=False))
        sampling = args.num_inference_steps * t_cfg + t_vae
        state["sampling_seconds"] = sampling
        print(f"   VAE decode {t_vae:.3f}s (peak {peak_vae} GiB); UNet with CFG (batch 2) {t_cfg:.3f}s; "
              f"{args.num_inference_steps}-step sampling of one image ~ {sampling:.2f}s")
        return {"vae_decode_seconds": t_vae, "vae_peak_gib": peak_vae, "unet_cfg_seconds": t_cfg,
                "sampling_seconds_estimate": sampling}

    check.run("VAE decode and sampling time", vae_and_sampling)

    def rnn_config():
        from golden_noise.model.rnn_seq_model_v3 import NoiseSequenceRNNConfig

        pooled = unet_cfg["projection_class_embeddings_input_dim"] - 6 * unet_cfg["addition_time_embed_dim"]
        return NoiseSequenceRNNConfig(noise_resolution=lat, text_embed_dim=pooled, **(TINY_RNN if tiny else {}))

    def rollout():
        from golden_noise.model.rnn_seq_model_v3 import NoiseSequenceRNN_v3

        cfg = rnn_config()
        model = NoiseSequenceRNN_v3(cfg).to(check.device).eval()
        x = torch.randn(1, 4, lat, lat, device=check.device)
        text = torch.randn(1, cfg.text_embed_dim, device=check.device)
        t = check.seconds_per_call(lambda: model.generate_sequence(x, text, args.num_steps))
        out = {"rollout_seconds": t, "n": args.num_steps, "dtype": "float32"}
        if state.get("sampling_seconds"):
            out["rollout_vs_sampling"] = t / state["sampling_seconds"]
        print(f"   rollout n={args.num_steps}, batch 1, float32: {t * 1000:.1f} ms"
              + (f" = {100 * out['rollout_vs_sampling']:.2f}% of a {args.num_inference_steps}-step sampling"
                 if "rollout_vs_sampling" in out else ""))
        return out

    check.run("RNN rollout vs sampling", rollout)

    def training():
        from golden_noise.training.core import sequence_loss, teacher_forcing_inputs
        from golden_noise.model.rnn_seq_model_v3 import NoiseSequenceRNN_v3

        cfg = rnn_config()
        model = NoiseSequenceRNN_v3(cfg).to(check.device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        b, n = args.train_batch_size, args.num_steps
        source = torch.randn(b, 4, lat, lat, device=check.device)
        golden = source[:, None] + 0.05 * torch.randn(b, n, 4, lat, lat, device=check.device)
        text = torch.randn(b, cfg.text_embed_dim, device=check.device)
        valid = torch.ones(b, device=check.device)
        rows = []
        precisions = ["no", "bf16"] if check.device.type == "cuda" else ["no"]
        for mp in precisions:
            def step():
                with torch.autocast(check.device.type, dtype=torch.bfloat16, enabled=mp == "bf16"):
                    mean, logvar = model(teacher_forcing_inputs(source, golden), text)
                    loss = sequence_loss(mean, logvar, golden, valid)["loss"]
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)

            check.reset_peak()
            try:
                t = check.seconds_per_call(step)
                rows.append({"mixed_precision": mp, "seconds_per_step": t, "sequences_per_s": b / t,
                             "peak_gib": check.peak_gib()})
            except Exception as e:  # out of memory, or an op without a bf16 kernel: keep the other row
                rows.append({"mixed_precision": mp, "error": first_line(e)})
                opt.zero_grad(set_to_none=True)
                check.free()
        params = sum(p.numel() for p in model.parameters())
        print_rows(rows, ["mixed_precision", "seconds_per_step", "sequences_per_s", "peak_gib"],
                   f"   NoiseSequenceRNN_v3 ({'tiny' if tiny else 'default'} config, {params / 1e6:.1f} M params), "
                   f"batch {b} x n={n}, latents {lat}x{lat}, AdamW:")
        return {"rows": rows, "params": params, "batch": b, "n": n}

    check.run("RNN training step", training)

    def compiled():
        fmt = "channels_last" if base.get("channels_last") and base.get("contiguous") and \
            base["channels_last"]["seconds_per_step"] < base["contiguous"]["seconds_per_step"] else "contiguous"
        ref = base.get(fmt) or golden_step_figures(check, unet, cmp_batch, args.num_steps)
        optimize_unet(unet, channels_last=fmt == "channels_last")
        t0 = time.perf_counter()
        optimize_unet(unet, compile_unet=True, mode=args.compile_mode, backend=args.compile_backend)
        try:
            step = sdxl_golden_step(unet)
            x = torch.randn(cmp_batch, 4, lat, lat).to(check.device)
            cond = common.random_conditioning(unet, cmp_batch, args.resolution, args.resolution, device=check.device)
            step(x, cond)  # compiles the 2B (CFG) and B graphs
            check.sync()
            compile_s = time.perf_counter() - t0
            fig = golden_step_figures(check, unet, cmp_batch, args.num_steps, share=False)
        finally:
            unet._compiled_call_impl = None  # back to eager
            torch._dynamo.reset()
            unet.to(memory_format=torch.contiguous_format)
        ratio = ref["seconds_per_step"] / fig["seconds_per_step"]
        print(f"   batch {cmp_batch}, {fmt}: compile (backend {args.compile_backend}, mode {args.compile_mode}) took "
              f"{compile_s:.0f}s; {fig['sequences_per_hour']:.0f} vs {ref['sequences_per_hour']:.0f} sequences/hour "
              f"eager: speed-up x{ratio:.3f}")
        return {"batch": cmp_batch, "memory_format": fmt, "compile_seconds": compile_s, "compiled": fig, "eager": ref,
                "speedup": ratio}

    if args.compile_backend != "none":
        check.run("torch.compile", compiled, min_left_s=args.min_compile_budget_s)

    # ---- summary
    summary = {}
    for name, best in sweeps.items():
        if best:
            summary[f"best_sequences_per_hour[{name}]"] = best["sequences_per_hour"]
            summary[f"best_batch[{name}]"] = best["batch"]
            summary[f"unet_share_at_best[{name}]"] = best["unet_share"]
    secs = check.results["sections"]
    for key, name in (("channels_last_speedup", "channels_last"), ("compile_speedup", "torch.compile")):
        if name in secs and "speedup" in secs[name]:
            summary[key] = secs[name]["speedup"]
    if "RNN rollout vs sampling" in secs and "rollout_vs_sampling" in secs["RNN rollout vs sampling"]:
        summary["rollout_vs_sampling_wall"] = secs["RNN rollout vs sampling"]["rollout_vs_sampling"]
    if best0:
        summary["goal_1500_sequences_per_hour_met"] = best0["sequences_per_hour"] >= 1500
    check.results["summary"] = summary
    print("\nsummary:")
    for k, v in summary.items():
        print(f"  {k} = {v:.4g}" if isinstance(v, float) else f"  {k} = {v}")
    print(f"total {check.elapsed():.0f}s; skipped: {check.results['skipped'] or 'nothing'}")
    check.save()
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
