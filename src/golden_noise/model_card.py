"""The model card (README.md) of a pushed export: YAML metadata the Hub reads (library, base model, tags, what ties
the model to a pipeline, the validation's explained fraction, the evaluation's summary when given) and a body that
says what the model was trained on, how to use it, how well it imitates the golden step, and what was measured."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from .errors import UserError
from .hub import card_text, is_repo_id, markdown_table
from .model import DEFAULT_MODEL_TYPE

LIBRARY = "golden-noise-rnn"


def model_card(meta: dict, identity: dict, repo_id: str, evaluation: str | os.PathLike | None = None) -> str:
    """The card of an export (`meta`: its config document; `identity`: weights and config sha256)."""
    model_type = meta.get("model_type") or DEFAULT_MODEL_TYPE
    rc, training = meta.get("run_config") or {}, meta.get("training") or {}
    family = (rc.get("family") or {}).get("name")
    base = rc.get("base_model_id")
    validation = _validation(training.get("validation"))
    summary = evaluation_summary(evaluation) if evaluation is not None else None
    golden = rc.get("golden") or {}
    metadata = {
        "library_name": LIBRARY, "base_model": base if base and is_repo_id(str(base)) else None,
        "tags": [t for t in ("golden-noise", "noise-optimization", "text-to-image", "diffusers", family, model_type)
                 if t],
        "golden_noise": {
            "model_type": model_type, "family": family, "base_model_id": base,
            "latent_shape": rc.get("latent_shape"),
            "latent_space_fingerprint": (rc.get("latent_space") or {}).get("fingerprint"),
            "golden": {k: golden.get(k) for k in ("denoise_guidance_scale", "inversion_guidance_scale",
                                                   "schedule_steps")},
            "num_steps": rc.get("num_steps"), "text_embedding": (rc.get("text_embedding") or {}).get("kind"),
            "data_fingerprint": training.get("data_fingerprint"),
            "train_samples": training.get("train_samples"), "validation_samples": training.get("validation_samples"),
            "validation_explained_fraction": validation["rollout"] if validation else None,
            "teacher_forcing_explained_fraction": validation["teacher_forcing"] if validation else None,
            "weights_sha256": identity["weights_sha256"], "config_sha256": identity["config_sha256"],
        },
    }
    if summary is not None:
        metadata["golden_noise"]["evaluation"] = summary["metadata"]
    body = [_intro(repo_id, model_type, rc), _usage(repo_id, base), _training_data(rc, training),
            _validation_section(validation), summary["markdown"] if summary else "", _files(identity)]
    return card_text(metadata, "\n\n".join(part for part in body if part), "model")


def _validation(report: dict | None) -> dict | None:
    if not report:
        return None
    return {"rollout": report["final_step"]["explained_fraction"], "steps": report.get("num_steps"),
            "teacher_forcing": report["teacher_forcing"]["explained_fraction"], "samples": report.get("num_samples"),
            "model_mse": report["final_step"].get("model_mse"),
            "baseline_mse": report["final_step"].get("baseline_mse")}


def _intro(repo_id: str, model_type: str, rc: dict) -> str:
    family = (rc.get("family") or {}).get("name", "?")
    shape = "×".join(str(s) for s in rc.get("latent_shape") or []) or "?"
    return (f"# {repo_id}\n\nA **{model_type}** golden-noise model made with {LIBRARY}. From a "
            "prompt and the initial noise x_T of a seed it predicts the golden noise x'_n that "
            f"n = {rc.get('num_steps')} golden steps (denoise one DDIM step with guidance w_l, invert it with "
            "guidance w_w) would make, for the "
            f"base model `{rc.get('base_model_id')}` ({family} latents {shape}); the pipeline then samples from it as "
            "from any initial latents. It only imitates the golden step: whether its images are better is what an "
            "evaluation measures (below, when one was given).")


def _usage(repo_id: str, base) -> str:
    load = (f'DiffusionPipeline.from_pretrained("{base}")' if base and is_repo_id(str(base))
            else f'DiffusionPipeline.from_pretrained(...)  # the base model it was trained with: {base}')
    return ("## Use\n\n```python\nimport torch\nfrom diffusers import DiffusionPipeline\n"
            "from golden_noise import GoldenNoise\n\n"
            f"pipe = {load}\ngn = GoldenNoise.from_pretrained(\"{repo_id}\", pipe=pipe)\n"
            'prompt = "A futuristic cityscape at sunset, synthwave style"\n'
            "image = pipe(prompt, latents=gn(prompt, seed=0)).images[0]  # standard: generator=torch.Generator()"
            ".manual_seed(0)\n```\n\n`GoldenNoise.from_pretrained` refuses a pipeline of another latent space or text "
            "embedding, and an edited `config.json` (its sha256 is sealed in `model.safetensors`).")


def _training_data(rc: dict, training: dict) -> str:
    golden, text = rc.get("golden") or {}, rc.get("text_embedding") or {}
    space = rc.get("latent_space") or {}
    rows = [
        ("base model", f"`{rc.get('base_model_id')}` ({(rc.get('family') or {}).get('name')}, "
                       f"{rc.get('pipeline_class', '?')})"),
        ("latent space", f"{space.get('latent_channels')} channels, VAE /{space.get('vae_scale_factor')}, scaling "
                         f"{space.get('scaling_factor')}; fingerprint `{space.get('fingerprint')}`"),
        ("image size", f"{rc.get('height')}×{rc.get('width')} px (latents "
                       f"{'×'.join(str(s) for s in rc.get('latent_shape') or [])})"),
        ("golden step", f"w_l = {golden.get('denoise_guidance_scale')}, w_w = {golden.get('inversion_guidance_scale')}"
                        f" on a {golden.get('schedule_steps')}-step DDIM schedule (t0 = {golden.get('t0')}), applied "
                        f"n = {rc.get('num_steps')} times"),
        ("text embedding", f"{text.get('kind')} ({text.get('dim')} values, from {text.get('source')})"),
        ("prompts", f"{rc.get('prompt_file') or 'file not recorded'}"
                    + (f", {rc['num_prompts']} prompts (fingerprint `{rc.get('prompt_fingerprint')}`)"
                       if rc.get("num_prompts") is not None else "") + f"; seeds from {rc.get('start_seed')}"),
        ("samples", f"{training.get('train_samples', '?')} for training, {training.get('validation_samples', '?')} "
                    "held out for validation (split by id)"),
        ("data fingerprint", f"`{training.get('data_fingerprint') or 'not recorded'}`"),
        ("training", f"{training.get('global_step', '?')} optimizer steps on {training.get('num_processes', '?')} "
                     f"process(es)"),
    ]
    return ("## Training data\n\nGolden-noise sequences made by the project's stage 2 (`generate_npd_series.py`): "
            "for each prompt and seed, x_T and the golden step applied n times.\n\n"
            + markdown_table(rows, ("", "")))


def _validation_section(v: dict | None) -> str:
    if v is None:
        return "## Validation\n\nThis export has no validation report (trained without a held-out split)."
    return (f"## Validation\n\nOn {v['samples']} held-out samples, the rollout's step n = {v['steps']} explains "
            f"**{v['rollout']:.4f}** of the golden change (1 − ‖x̂'_n − x'_n‖² / ‖x_T − x'_n‖²; "
            "model mse "
            f"{v['model_mse']:.4g} vs {v['baseline_mse']:.4g} for x_T unchanged), and {v['teacher_forcing']:.4f} "
            "with teacher forcing (against predicting each step unchanged). 0 is no better than keeping x_T; "
            "this measures imitation of the golden step, not image quality.")


def _files(identity: dict) -> str:
    return ("## Files\n\n" + markdown_table([
        ("model.safetensors", f"sha256 `{identity['weights_sha256']}`"),
        ("config.json", f"canonical-JSON sha256 `{identity['config_sha256']}` (sealed in the weights' metadata)"),
    ], ("file", "identity")) + "\n\nStages 4, 5 and the sweep record both in their settings; a rerun with another "
            "export is refused.")


# ---- the evaluation's summary -------------------------------------------------------------------------------------
def evaluation_summary(path: str | os.PathLike) -> dict:
    """{"metadata": ..., "markdown": ...} of a stage-6 results folder (or its summary.json) or a sweep folder (or its
    sweep.csv); a UserError naming the path when it is neither."""
    p = Path(path)
    if p.is_dir():
        for name in ("summary.json", "sweep.csv"):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise UserError(f"evaluation {path}: no summary.json (evaluate_hps.py) or sweep.csv (sweep.py) in it: "
                            "pass a stage-6 --results_dir or a sweep --output_dir")
    try:
        if p.suffix == ".json":
            return _stage6(json.loads(p.read_text(encoding="utf-8")), p)
        if p.suffix == ".csv":
            with open(p, encoding="utf-8", newline="") as f:
                return _sweep(list(csv.DictReader(f)), p)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"evaluation {p} cannot be summarised ({type(e).__name__}: {e}): pass an evaluate_hps.py "
                        "summary.json or a sweep.csv") from None
    raise UserError(f"evaluation {p}: expected a summary.json (evaluate_hps.py) or a sweep.csv (sweep.py)")


def _signed(x) -> str:
    return "" if x is None else f"{x:+.4f}"


def _stage6(summary: dict, path: Path) -> dict:
    baseline, results = summary["baseline"], summary["results"]
    rows, meta = [], {}
    for metric, by_method in results.items():
        for method, r in by_method.items():
            paired = "diff_mean" in r
            rows.append((metric, method, r["n"], f"{r['mean']:.4f}",
                         f"{_signed(r['diff_mean'])} [{_signed(r['ci95_low'])}, {_signed(r['ci95_high'])}]"
                         if paired else "(baseline)", f"{100 * r['win_rate']:.1f}%" if paired else ""))
            meta.setdefault(metric, {})[method] = {
                "n": r["n"], "mean": r["mean"],
                **({"diff": r["diff_mean"], "ci95": [r["ci95_low"], r["ci95_high"]], "win_rate": r["win_rate"]}
                   if paired else {})}
    text = (f"## Evaluation\n\nScored by `evaluate_hps.py` on {summary.get('n_evaluated')} of "
            f"{summary.get('n_prompts')} prompts ({summary.get('prompt_file')}); paired by prompt and seed against "
            f"`{baseline}`, 95% bootstrap CIs, ties count half a win.\n\n"
            + markdown_table(rows, ("metric", "method", "n", "mean", f"diff vs {baseline} [95% CI]", "win rate")))
    return {"metadata": {"source": "evaluate_hps.py", "baseline": baseline, "n_evaluated": summary.get("n_evaluated"),
                         "prompt_file": summary.get("prompt_file"), "results": meta},
            "markdown": text}


def _num(value: str):
    return None if value in ("", None) else float(value)


def _sweep(rows: list[dict], path: Path) -> dict:
    if not rows:
        raise ValueError("no rows")
    table, meta = [], []
    for r in rows:
        diff = _num(r["diff"])
        table.append((r["num_inference_steps"], r["guidance_scale"], r["method"], r["num_gen_steps"], r["metric"],
                      r["n"], f"{float(r['mean']):.4f}",
                      "(baseline)" if diff is None else
                      f"{_signed(diff)} [{_signed(_num(r['ci_low']))}, {_signed(_num(r['ci_high']))}]",
                      "" if _num(r["win_rate"]) is None else f"{100 * float(r['win_rate']):.1f}%"))
        if diff is not None:
            meta.append({"num_inference_steps": int(r["num_inference_steps"]),
                         "guidance_scale": float(r["guidance_scale"]), "method": r["method"],
                         "num_gen_steps": int(r["num_gen_steps"]) if r["num_gen_steps"] else None,
                         "metric": r["metric"], "n": int(r["n"]), "diff": diff,
                         "ci95": [_num(r["ci_low"]), _num(r["ci_high"])], "win_rate": _num(r["win_rate"])})
    text = ("## Evaluation\n\nA sweep (`sweep.py`) over guidance scales, sampling steps and methods, scored per "
            "cell; diff = method − standard at the same guidance and steps, paired by prompt and seed, with its 95% "
            "bootstrap CI.\n\n" + markdown_table(table, ("steps", "guidance", "method", "n (rollout)", "metric",
                                                       "prompts", "mean", "diff vs standard [95% CI]", "win rate")))
    return {"metadata": {"source": "sweep.py", "cells": meta}, "markdown": text}
