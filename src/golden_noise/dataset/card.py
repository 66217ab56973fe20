"""The dataset card (README.md) of a sharded dataset: YAML metadata (its `configs` tell `datasets.load_dataset` that
the data are data/shard-*.parquet, locally and on the Hub) and what made the data: model, golden step, prompt
source, counts and, for a scored dataset, the scores."""
from __future__ import annotations

from pathlib import Path

from ..hub import card_text, markdown_table
from . import format as F
from .shards import ShardFile

CARD = "README.md"


def size_category(n: int) -> str:
    """The Hub's size_categories value for n samples."""
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "1M<n<10M"


def score_summary(root: Path, index: dict) -> dict | None:
    """Means of reward_standard, reward_golden, reward_gain and the share of samples whose gain is > 0 (None when
    the shards hold no scores); reads those columns only."""
    import numpy as np

    columns = {k: [] for k in F.SCORE_FIELDS}
    for record in index["shards"]:
        shard = ShardFile(root / record["file"])
        if "reward_gain" not in shard.file.schema_arrow.names:
            return None
        for k in F.SCORE_FIELDS:
            columns[k].append(shard.column(k))
    values = {k: np.concatenate(v) for k, v in columns.items()}
    return {**{f"mean_{k}": float(v.mean()) for k, v in values.items()},
            "share_gain_positive": float((values["reward_gain"] > 0).mean())}


def dataset_card(root: Path, run_config: dict, index: dict, repo_id: str | None = None,
                 prompt_source: str | None = None) -> str:
    """The card's text (deterministic: the same run gives the same bytes on every machine), written with
    golden_noise.hub's card and table helpers."""
    n, golden = index["num_samples"], run_config.get("golden", {})
    scoring = run_config.get("scoring")
    scores = score_summary(root, index) if scoring else None
    name = repo_id or "PATH_OR_REPO_ID"
    source = prompt_source or run_config.get("prompt_file") or "unknown"
    c, h, w = run_config["latent_shape"]
    family = run_config.get("family", {}).get("name")
    metadata = {"configs": [{"config_name": "default", "data_files": [{"split": "train",
                                                                        "path": f"{F.DATA}/shard-*.parquet"}]}],
                "tags": ["golden-noise", "noise-prompt", "diffusion", *([family] if family else [])],
                "task_categories": ["text-to-image"], "size_categories": [size_category(n)]}
    revision = f" (revision {run_config['revision']})" if run_config.get("revision") else ""
    rows = [("model", f"`{run_config['base_model_id']}`{revision}, {run_config.get('pipeline_class')}, "
                      f"{run_config.get('dtype')}"),
            ("golden step", f"n = {run_config['num_steps']}, N = {golden.get('schedule_steps')}, w_l = "
                            f"{golden.get('denoise_guidance_scale')}, w_w = {golden.get('inversion_guidance_scale')}"
                            f"{', t0 = ' + str(golden['t0']) if 't0' in golden else ''}"),
            ("noise", f"{c}x{h}x{w} latents ({run_config.get('height')}x{run_config.get('width')} px), stored as "
                      f"{run_config.get('storage_dtype')}; seed of sample `id` = "
                      f"{run_config.get('start_seed', 0)} + id"),
            ("text embedding", f"{run_config['text_embedding'].get('kind')}, {run_config['text_embedding']['dim']}-d"),
            ("prompts", f"{source}: {run_config.get('num_prompts')} prompts (sha256 "
                        f"{str(run_config.get('prompt_fingerprint'))[:16]}...), sample `id` = the prompt's line"),
            ("files", f"{index['num_shards']} Parquet shard(s) of at most {index['samples_per_shard']} samples, "
                      f"{index['bytes'] / 1e9:.3g} GB; sha256 of each in index.json"),
            ("fingerprint", f"`{index['fingerprint']}`")]
    if scoring:
        rows.append(("scores", f"{scoring.get('metric')} of the image sampled from x_T (reward_standard) and from "
                               f"x'_n (reward_golden), {scoring.get('num_inference_steps')} steps, guidance "
                               f"{scoring.get('guidance_scale')}"))
        if scores:
            rows.append(("score means", f"standard {scores['mean_reward_standard']:.4g}, golden "
                                        f"{scores['mean_reward_golden']:.4g}, gain {scores['mean_reward_gain']:+.4g}; "
                                        f"gain > 0 for {scores['share_gain_positive']:.1%} of the samples"))
    columns = ("`id` (the prompt's 0-based line), `prompt`, `seed`, `source` [C,H,W] = x_T, `golden` [n,C,H,W] = "
               "x'_1 ... x'_n, `text` [P] = the text embedding the RNN is conditioned on"
               + (", `prompt_embeds` [T,D]" if run_config.get("save_prompt_embeds") else "")
               + (", `reward_standard`, `reward_golden`, `reward_gain`" if scoring else "")
               + ". `run_config.json` holds every setting that shaped the data.")
    body = "\n".join([
        f"# Golden-noise sequences for {run_config['base_model_id']}", "",
        f"{n} samples, each an initial noise x_T and the sequence x'_1 ... x'_n it becomes under n = "
        f"{run_config['num_steps']} golden steps (NPNet's golden step: denoise one DDIM step with guidance w_l, "
        "invert it with guidance w_w), made by stage 2 of golden-noise-rnn (`src/generate_npd_series.py`).", "",
        markdown_table(rows, ("what", "value")), "", "## Columns", "", columns, "", "## Use", "", "```python",
        "from datasets import load_dataset", "", f'ds = load_dataset("{name}", split="train", streaming=True)', "```",
        "", "Train a golden-noise RNN on it (exact resume, shards verified before training):", "", "```bash",
        f"python src/train_rnn_model_v3.py --dataset_dir {name} --output_dir ./output/rnn", "```"])
    return card_text(metadata, body, repo_type="dataset")
