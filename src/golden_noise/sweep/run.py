"""run_sweep: make every missing image of a grid through stage 5's batch runner (one pipeline load, sharded like
stage 5), score them with stage 6's scoring, and write sweep.csv, the plots and report.html.

Resumable: a unit (a batch-runner folder and method) whose images and manifest are complete is skipped, one with
some images missing is finished by the batch runner (same batches, same pixels), and scores are kept per unit and
metric, so a killed sweep rerun with the same command ends with the same results. Only the main process scores
and writes the sweep's own files; every process takes its share of every unit's global batches.

Across machines (as stage 5): task i of K (`num_shards`/`shard_index`, runs.Task; Slurm array defaults) makes global
batches i, i + K, ... of every unit and locks those batches of the sweep's folder; the run that finds every unit
complete scores the cells and writes the table (`finalize`: that alone, making no image)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..errors import UserError
from ..io import atomic_write_json, atomic_write_text
from ..cli import check_seeds
from ..methods import LEARNED, ONE_STEP, best_of_k, folder
from ..prompts import Prompt, prompt_fingerprint, read_prompts
from ..runtime import distributed_state, each_message_once, get_logger, global_batches, on_main, resolve_device
from .grid import SEED_STRIDE, Cell, Unit, grid_cells, grid_units
from .job import (EARLY_KEYS, KEPT_WHEN_UNUSED, LOADED_KEYS, PROMPTS_FILE, SAMPLER_FIELDS, SETTINGS_FILE, SweepJob,
                  check_job, metric_record, refuse_changed_metrics, rollout_lengths, unit_job, uses_best_of)
from ..inference.api import golden_config_from
from ..inference.batch import (SETTINGS_FILE as BATCH_SETTINGS, finalize_batch, intact_png, missing_images,
                               run_batch, shared_files)
from ..inference.config import (learned_record, load_golden_noise, load_job_pipelines, load_one_step_models,
                                pipeline_record, rnn_record, sampling_record)
from ..runs import RunLock, Task, check_writable_dir, keep_unused, read_settings, refuse_mixed_rerun
from .cost import rollout_unet_fractions
from .plots import write_plots
from .report import ImageRows, write_report
from .scores import best_of_choice, cell_scores, check_rewards, image_files, score_units, unit_cost
from .table import TableInputs, table_rows, text_table, write_csv

logger = get_logger(__name__)


@dataclass
class SweepPlan:
    """A checked sweep: its job, prompts, cells and units, settings, and (once loaded) the models."""

    job: SweepJob
    state: object
    out: Path
    prompts: list[Prompt]
    cells: list[Cell]
    units: list[Unit]
    settings: dict
    gn: object = None
    others: dict = field(default_factory=dict)  # {direct / npnet: GoldenNoise}, the one-step models asked for
    pipe: object = None
    sampler: object = None  # the pipeline that samples the images: `pipe` itself unless a separate sampler is asked
    timings: dict = field(default_factory=dict)
    task: Task = Task()  # which of the K separate runs sharing the folder this is
    complete: set = field(default_factory=set)  # (main process) indices of the units found complete: images stay

    @property
    def indices(self) -> list[int]:
        return [p.index for p in self.prompts]


def prepare_sweep(job: SweepJob, state) -> SweepPlan:
    """Check the flags, read the prompts, resolve the settings and refuse a rerun with other ones, all before
    any pipeline loads."""
    check_job(job)
    prompts = read_prompts(job.prompt_file, job.prompt_column)[: job.max_prompts]
    if uses_best_of(job) and prompts[-1].index >= SEED_STRIDE:
        raise UserError(f"best_of_K seeds prompt i's candidate k as start_seed + i + k * {SEED_STRIDE}: the prompt "
                        f"file has indices up to {prompts[-1].index}; use --max_prompts {SEED_STRIDE} or fewer")
    last = prompts[-1].index + (max(best_of_k(m) or 1 for m in job.methods) - 1) * SEED_STRIDE
    check_seeds("--start_seed", job.start_seed, last, f"the largest seed offset (prompt index + k x {SEED_STRIDE:,} "
                "for best_of_K's candidate k)")
    out = check_writable_dir(job.output_dir, "--output_dir")
    device = state.device if job.pipeline.device == "auto" else resolve_device(job.pipeline.device)
    gn = load_golden_noise(job.rnn_weights_path, device)
    others = load_one_step_models(job.methods, {m: getattr(job, LEARNED[m][1]) for m in ONE_STEP}, device)
    ref = gn or next(iter(others.values()), None)  # the export that sets the defaults (model id, size, n, golden)
    ns = rollout_lengths(job, ref)
    golden = golden_config_from(ref.run_config if ref else None, **job.golden_overrides) \
        if "oracle" in job.methods else None
    sampling = job.sampling
    identity = rnn_record(gn if "gnsnet" in job.methods else None)  # the export's weights and config sha256
    settings = {"prompt_file": str(job.prompt_file), "prompt_fingerprint": prompt_fingerprint(prompts),
                "num_prompts": len(prompts), "start_seed": job.start_seed, "seed_stride": SEED_STRIDE,
                "batch_size": job.batch_size, **{k: getattr(sampling, k) for k in SAMPLER_FIELDS},
                "height": sampling.height, "width": sampling.width,
                **pipeline_record(job.pipeline, ref, device), "revision": job.pipeline.revision,
                "variant": job.pipeline.variant, "enable_vae_slicing": job.pipeline.enable_vae_slicing,
                "enable_vae_tiling": job.pipeline.enable_vae_tiling, "golden": golden.to_dict() if golden else None,
                **{k: identity[k] for k in ("rnn_sha256", "rnn_config_sha256")},
                **{k: v for m in ONE_STEP for k, v in learned_record(m, others.get(m)).items()
                   if k in (f"{m}_sha256", f"{m}_config_sha256")},
                "standard_steps": job.standard_steps,
                "guidance_scales": job.guidance_scales, "num_inference_steps": job.num_inference_steps,
                "num_gen_steps": ns, "methods": job.methods, "metrics": metric_record(job.metrics),
                "selection_metric": job.selection}
    path = out / SETTINGS_FILE
    refuse_mixed_rerun(path, settings, EARLY_KEYS, "--output_dir", "a sweep", lenient=KEPT_WHEN_UNUSED)
    refuse_changed_metrics(path, read_settings(path, "--output_dir"), job.metrics)
    on_main(state, lambda: check_rewards(job.metrics))  # before anything is written or any pipeline loads
    cells = grid_cells(job.guidance_scales, job.num_inference_steps, job.methods, ns,
                       {m: model.predicts_step for m, model in others.items()}, job.standard_steps)
    return SweepPlan(job, state, out, prompts, cells, grid_units(cells), settings, gn=gn, others=others)


def record_settings(plan: SweepPlan) -> None:
    """(Main process) write the prompts the units read and sweep_settings.json; the grid, methods and metrics
    recorded are everything this folder holds (a rerun may add to them)."""
    lines = {p.index: p.text for p in plan.prompts}
    text = "".join(lines.get(i, "") + "\n" for i in range(plan.prompts[-1].index + 1))
    path = plan.out / PROMPTS_FILE
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        atomic_write_text(path, text)
    old = read_settings(plan.out / SETTINGS_FILE, "--output_dir") or {}
    record = keep_unused(plan.settings, old, KEPT_WHEN_UNUSED)
    for key in ("guidance_scales", "num_inference_steps", "standard_steps", "num_gen_steps", "methods"):
        record[key] = list(dict.fromkeys([*old.get(key, []), *record[key]]))
    record["metrics"] = {**old.get("metrics", {}), **record["metrics"]}
    atomic_write_json(plan.out / SETTINGS_FILE, record)


def load_models(plan: SweepPlan) -> None:
    """Load the pipeline and its sampler once (as stage 5 would for every unit)."""
    device = plan.settings["device_used"]
    if plan.state.is_main_process:
        logger.info("loading %s (%s on %s)", plan.settings["base_model_id_used"], plan.settings["dtype_used"], device)
    plan.pipe, plan.sampler = load_job_pipelines(plan.job.pipeline, plan.job.sampling, plan.settings, device)


def unit_complete(plan: SweepPlan, unit: Unit) -> bool:
    """Nothing for the batch runner to do: every image of the unit is intact and its merged manifest lists it."""
    import csv

    base = unit.folder(plan.out)
    if not (base / "manifest.csv").is_file() or not (base / BATCH_SETTINGS).is_file():
        return False
    images = base / folder(unit.method)
    if not all(intact_png(images / f"{i}.png") for i in plan.indices):
        return False
    with open(base / "manifest.csv", encoding="utf-8", newline="") as f:
        listed = {int(r["index"]) for r in csv.DictReader(f) if r.get("method") == unit.method}
    return listed >= set(plan.indices)


def known_complete(plan: SweepPlan, i: int) -> bool:
    """(Main process) unit i is complete: known so (a unit's images never go away), else checked (`unit_complete`
    decodes every image) and remembered."""
    if i not in plan.complete and unit_complete(plan, plan.units[i]):
        plan.complete.add(i)
    return i in plan.complete


def make_images(plan: SweepPlan) -> None:
    """Run the batch runner on every incomplete unit: this task's share of its global batches, every process of
    the task taking its share of those."""
    state = plan.state
    state.wait_for_everyone()
    todo = on_main(state, lambda: [i for i in range(len(plan.units)) if not known_complete(plan, i)])
    if state.is_main_process:
        logger.info("sweep: %d cells need %d units of %d prompts; %d complete, %d to make", len(plan.cells),
                    len(plan.units), len(plan.prompts), len(plan.units) - len(todo), len(todo))
    started = time.perf_counter()
    for number, i in enumerate(todo, start=1):
        unit = plan.units[i]
        if state.is_main_process:
            logger.info("unit %d/%d: %s", number, len(todo), unit.label())
        summary = run_batch(unit_job(plan.job, unit, plan.out / PROMPTS_FILE, plan.out, plan.task), state,
                            pipe=plan.pipe, sampler=plan.sampler, gn=plan.gn, others=plan.others)
        if summary is not None and "missing" not in summary:  # (main process) the batch runner merged it whole
            plan.complete.add(i)
    plan.timings["images_seconds"] = time.perf_counter() - started


def image_rows(plan: SweepPlan, scores, metric: str) -> list:
    """The report's image rows: the first --image_rows prompts at each (guidance, steps), every cell a column."""
    indices = plan.indices[: plan.job.image_rows]
    if not indices:
        return []
    blocks = []
    for s in dict.fromkeys(c.num_inference_steps for c in plan.cells):
        for w in dict.fromkeys(c.guidance_scale for c in plan.cells):
            cells = [c for c in plan.cells if (c.guidance_scale, c.num_inference_steps) == (w, s)]
            block = ImageRows(w, s, [], indices)
            for c in cells:
                label = c.method + (f" n={c.num_gen_steps}" if c.num_gen_steps else "")
                units = c.units()
                pick = best_of_choice(c, scores, plan.job.selection) if len(units) > 1 else [0] * len(plan.indices)
                values = cell_scores(c, scores, metric, plan.job.selection)
                block.columns.append(label)
                block.files[label] = {i: image_files(units[pick[j]], plan.out, [i])[0]
                                      for j, i in enumerate(plan.indices) if i in indices}
                block.scores[label] = {i: float(values[j]) for j, i in enumerate(plan.indices) if i in indices}
            blocks.append(block)
    return blocks


def analyse(plan: SweepPlan) -> dict:
    """(Main process) score every unit, count the costs, and write sweep.csv, the plots and report.html."""
    job, out = plan.job, plan.out
    texts = [p.text for p in plan.prompts]
    started = time.perf_counter()
    scores = score_units(plan.units, job.metrics, out, plan.indices, texts, job.progress)
    plan.timings["scoring_seconds"] = time.perf_counter() - started
    record = plan.settings
    learned = {m: (plan.gn if m == "gnsnet" else plan.others[m],
                   sorted({c.num_gen_steps for c in plan.cells if c.method == m}))
               for m in dict.fromkeys(c.method for c in plan.cells) if m in ("gnsnet", *plan.others)}
    fractions = rollout_unet_fractions(learned, plan.pipe, record["latent_shape"], record["height_used"],
                                       record["width_used"]) if learned else {}
    inputs = TableInputs(plan.cells, scores, {u: unit_cost(u, out) for u in plan.units}, fractions,
                         [m.name for m in job.metrics], job.selection, job.bootstrap_samples, job.seed)
    rows = table_rows(inputs)
    write_csv(out / "sweep.csv", rows)
    plan.timings["table_seconds"] = time.perf_counter() - started - plan.timings["scoring_seconds"]
    plots = write_plots(rows, out)
    prompts = {p.index: p.text for p in plan.prompts}
    write_report(out / "report.html", rows, plots, image_rows(plan, scores, job.metrics[0].name), prompts,
                 title=f"Where golden noise pays: {len(plan.cells)} cells x {len(job.metrics)} metric(s)",
                 subtitle=f"{len(plan.prompts)} prompts from {job.prompt_file} (seeds from {job.start_seed}); "
                          f"model {plan.settings['base_model_id_used']}; generated "
                          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}")
    plan.timings["analysis_seconds"] = time.perf_counter() - started - plan.timings["scoring_seconds"]
    return {"rows": rows, "table": text_table(rows), "plots": [str(p) for p in plots],
            "csv": str(out / "sweep.csv"), "report": str(out / "report.html"), "timings": plan.timings}


def missing_images_of(plan: SweepPlan) -> list[tuple[Unit, list[dict]]]:
    """(unit, its missing images: {"batch", "index"}) of each incomplete unit: no manifest row, no file or a damaged
    one. A unit whose images are all there but whose manifest the run that made the last of them did not merge (it
    was stopped first) is merged here (stage 5's finalize)."""
    missing = []
    for i, unit in enumerate(plan.units):
        if known_complete(plan, i):
            continue
        base = unit.folder(plan.out)
        found = missing_images(base, plan.prompts, plan.job.batch_size, [unit.method])
        if not found and (base / BATCH_SETTINGS).is_file():
            finalize_batch(unit_job(plan.job, unit, plan.out / PROMPTS_FILE, plan.out))
            if known_complete(plan, i):
                continue
            found = [{"batch": b, "index": p.index} for b, batch in  # listed and there, but damaged
                     enumerate(global_batches(plan.prompts, plan.job.batch_size)) for p in batch
                     if not intact_png(base / folder(unit.method) / f"{p.index}.png")]
        missing.append((unit, found))
    return missing


def describe_missing(plan: SweepPlan, missing: list[tuple[Unit, list[dict]]]) -> str:
    """'N of M images of U of V units are missing (global batch(es) ...; e.g. cells/.../3.png)', for one line."""
    images = [m for _, found in missing for m in found]
    batches = sorted({m["batch"] for m in images})
    unit, found = next((u, found) for u, found in missing if found) if images else (missing[0][0], [])
    example = unit.folder(plan.out) / folder(unit.method) / (f"{found[0]['index']}.png" if found else "")
    return (f"{len(images)} of {len(plan.units) * len(plan.prompts)} images of {len(missing)} of {len(plan.units)} "
            f"units are missing (global batch(es) {', '.join(map(str, batches[:10]))}"
            f"{', ...' if len(batches) > 10 else ''}; e.g. {example.relative_to(plan.out)})")


def refuse_missing(plan: SweepPlan, missing: list[tuple[Unit, list[dict]]]) -> None:
    """--finalize of a sweep whose tasks have not made every image: a UserError naming what is missing."""
    if missing:
        raise UserError(f"--finalize: {describe_missing(plan, missing)} in {plan.out}: rerun the task(s) that make "
                        "them (the same command), then --finalize again")


def conclude(plan: SweepPlan) -> dict:
    """(Main process) once every unit of the grid is complete (the other tasks' batches too), score the cells and
    write the table (`analyse`); else what is still missing (with --finalize a UserError). Under the folder's shared
    lock: the sweep's last two tasks may finish at once, and one analyses after the other."""
    with shared_files(plan.out, "--output_dir"):
        missing = missing_images_of(plan)
        if plan.job.finalize:
            refuse_missing(plan, missing)
        if missing:
            logger.info("task %d of %d done; %s: the run that completes them scores the cells and writes sweep.csv, "
                        "the plots and report.html (or run the same command with --finalize once all tasks are "
                        "done)", plan.task.index, plan.task.count, describe_missing(plan, missing))
            return {"missing": {u.label(): len(images) for u, images in missing}, "num_shards": plan.task.count,
                    "shard_index": plan.task.index, "timings": plan.timings}
        return analyse(plan)


def resolved_sizes(plan: SweepPlan) -> None:
    """Image size and latent shape every unit uses (as stage 5 resolves them); a rerun whose sizes differ from the
    folder's is refused, so no cell of another size joins it."""
    plan.settings.update(sampling_record(plan.pipe, plan.job.sampling, plan.gn, others=plan.others.values()))
    refuse_mixed_rerun(plan.out / SETTINGS_FILE, plan.settings, LOADED_KEYS, "--output_dir", "a sweep")


def run_sweep(job: SweepJob, state=None) -> dict | None:
    """Make, score and tabulate every cell of `job`'s grid; returns the results on the main process (a task of K whose
    folder still misses other tasks' images: what is missing, `missing`, and no table). Every unit runs
    stage 5's checks, so a warning or note about a flag (e.g. an n the RNN was not trained on) is said once, by the
    main process, not once per cell and process."""
    state = state if state is not None else distributed_state()
    task = Task.resolve(job.num_shards, job.shard_index)  # a bad --shard_index fails before anything loads
    with each_message_once(state.is_main_process):
        plan = prepare_sweep(job, state)
        plan.task = task
        batches = [] if job.finalize else task.shards(len(global_batches(plan.prompts, job.batch_size)))
        lock = RunLock(plan.out, "--output_dir", batches, what="batch")  # the other tasks run beside this one
        on_main(state, lock.acquire)
        result: dict = {}
        try:
            if job.finalize:  # before any pipeline: nothing to finalize while images are missing
                on_main(state, lambda: refuse_missing(plan, missing_images_of(plan)))
            started = time.perf_counter()
            load_models(plan)
            plan.timings["load_seconds"] = time.perf_counter() - started
            resolved_sizes(plan)

            def record() -> None:
                with shared_files(plan.out, "--output_dir"):  # every task writes the same settings
                    record_settings(plan)

            on_main(state, record)
            if not job.finalize:
                make_images(plan)
            state.wait_for_everyone()
            on_main(state, lambda: result.update(conclude(plan)))
            state.wait_for_everyone()
        finally:
            lock.release()
    return result or None
