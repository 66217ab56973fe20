"""A trained noise model's export: its weights and its config document, sealed together, loaded strictly.

Two layouts hold the same two files:
    {stem}.safetensors + {stem}.json     what training writes (`<output_dir>/rnn_v3_model_final.*`)
    model.safetensors + config.json      a hub repo (or a folder of one), with its model card README.md
The config document is {"model_type" (absent: NoiseSequenceRNN_v3), "model_config", "run_config" (the training
data's: family, latent space, golden step, n, text embedding, base model), "training" (flags, data fingerprint,
validation)}. The weights file's safetensors metadata records the sha256 of the document's canonical JSON
(`config_sha256`), so an edited config (a delta_scale, a run_config.num_steps) fails to load with one line; the
export's identity (weights sha256 + config sha256) goes into every run's settings.

Loading is strict: unknown or missing keys, weights of another architecture, a foreign model type, a hub repo with
pickles or without the keys that tie the model to a pipeline are one-line errors. The model class comes from the
registry of golden_noise.model by the config's model_type.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import hub
from .diffusion import TEXT_EMBEDDINGS, family_names
from .diffusion.base import fingerprint
from .errors import UserError, one_line
from .io import atomic_path, atomic_write_json, atomic_write_text
from .model import DEFAULT_MODEL_TYPE, model_class
from .model_card import model_card
from .runs import jsonable
from .runtime import get_logger

logger = get_logger(__name__)

FINAL_STEM = "rnn_v3_model_final"  # the training export's file stem
HUB_WEIGHTS, HUB_CONFIG, CARD = "model.safetensors", "config.json", "README.md"
CONFIG_KEYS = ("model_type", "model_config", "run_config", "training")  # everything a config document may hold
SEAL = "config_sha256"  # the weights' metadata key holding the sha256 of the config's canonical JSON
# run_config keys that tie a model to a pipeline: required on the hub (pushed and loaded), checked when present
PIPELINE_KEYS = ("base_model_id", "family", "latent_space", "golden", "num_steps", "latent_shape", "text_embedding")
EXPORT_HINT = (f"pass the training --output_dir, its {FINAL_STEM}.safetensors export, a folder or hub repo "
               f"(owner/name) holding {HUB_WEIGHTS} + {HUB_CONFIG}")


# ---- the seal -----------------------------------------------------------------------------------------------------
def canonical_json(doc) -> str:
    """The one JSON spelling of a document: sorted keys, no spaces (what the seal hashes)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def config_sha256(doc: dict) -> str:
    """sha256 of a config document's canonical JSON (independent of indentation and key order)."""
    return hashlib.sha256(canonical_json(doc).encode("utf-8")).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, hashed once per (path, size, mtime): a sweep records the same export for every unit."""
    st = Path(path).stat()
    return _file_sha256(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def safetensors_bytes(tensors: dict, metadata: dict[str, str]) -> bytes:
    """A safetensors file's bytes, equal for equal tensors and metadata.

    safetensors writes its metadata in the order of a hash map seeded per process, so two identical exports
    differed; the header is rewritten here with the metadata keys sorted and the tensors in data order."""
    from safetensors.torch import save

    blob = save(tensors, metadata=metadata)
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    meta = header.pop("__metadata__", {})
    ordered = dict(sorted(header.items(), key=lambda item: (item[1]["data_offsets"], item[0])))
    head = json.dumps({"__metadata__": dict(sorted(meta.items())), **ordered}, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header to a multiple of 8 bytes with spaces
    return len(head).to_bytes(8, "little") + head + blob[8 + n:]


def weights_metadata(path: Path) -> dict[str, str]:
    """The safetensors metadata of a weights file (a UserError naming it when it is not one)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # truncated, corrupt, or not safetensors
        raise UserError(f"cannot load model weights {path}: {one_line(e)}") from None


# ---- where an export is -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportFiles:
    """An export's two files, and where they came from (a hub repo and its commit, or None for a local path)."""

    weights: Path
    config: Path
    repo_id: str | None = None
    revision: str | None = None  # the hub commit the files are from

    @property
    def hub_layout(self) -> bool:
        return self.weights.name == HUB_WEIGHTS and self.config.name == HUB_CONFIG

    @property
    def source(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.repo_id else str(self.weights)


def resolve_export(source: str | os.PathLike, revision: str | None = None, token: str | bool | None = None,
                   what: str = "model") -> ExportFiles:
    """The files of an export given as: its `.safetensors` or `.json`, their stem, the training run directory, the
    seed's spelling `.../rnn_v3_model_final.pth` (= the safetensors export beside it; a pickle is never loaded), a
    folder holding model.safetensors + config.json, or a hub repo id `owner/name` (downloaded, or from the cache
    when offline; `revision`: a branch, tag or commit). A local path wins over a hub id of the same spelling."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.suffix == ".pth":
        stem = path.with_suffix("")
        if path.is_file() and not stem.with_name(stem.name + ".safetensors").is_file():
            raise UserError(f"{what} {path} is a pickle, which is never loaded (it could run code), and there is no "
                            f"{stem.name}.safetensors beside it: pass the training run's safetensors export "
                            "(train_rnn_model_v3.py writes it)")
        path = stem
    if path.is_dir():
        return _folder_export(path, what)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    weights, config = stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")
    local = path.suffix in (".safetensors", ".json") or weights.exists() or config.exists()
    if not local and hub.is_repo_id(text):
        folder = hub.snapshot(text, "model", revision=revision, token=token, what=what,
                              allow_patterns=[HUB_WEIGHTS, HUB_CONFIG, CARD])  # after the repo's pickle check
        files = _folder_export(folder, f"hub repo {text}", hub_only=True)
        return dataclasses.replace(files, repo_id=text, revision=folder.name)
    for f in (weights, config):
        if not f.is_file():
            raise UserError(f"model file {f} does not exist: {EXPORT_HINT}")
    return ExportFiles(weights.resolve(), config.resolve())


def _folder_export(folder: Path, where: str, hub_only: bool = False) -> ExportFiles:
    """The export in a folder: the training run's {FINAL_STEM}.* or a hub layout (model.safetensors + config.json;
    refused when the folder holds pickles)."""
    stem = folder / FINAL_STEM
    if not hub_only and (stem.with_suffix(".safetensors").exists() or stem.with_suffix(".json").exists()):
        return resolve_export(stem)
    weights, config = folder / HUB_WEIGHTS, folder / HUB_CONFIG
    if not (weights.is_file() and config.is_file()):
        have = ", ".join(hub.folder_files(folder)[:6]) or "nothing"
        raise UserError(f"{where} ({folder}) holds no golden-noise export (it has {have}): {EXPORT_HINT}")
    hub.refuse_pickles(hub.folder_files(folder), f"{where} ({folder})")
    return ExportFiles(weights if hub_only else weights.resolve(), config if hub_only else config.resolve())


# ---- the config document ------------------------------------------------------------------------------------------
def read_config(files: ExportFiles) -> dict:
    """The export's config document, checked strictly and against the seal in its weights file."""
    try:
        doc = json.loads(files.config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"invalid model config {files.config}: {one_line(e)}") from None
    where = files.config if not files.repo_id else f"{files.config.name} of hub repo {files.repo_id}"
    check_config(doc, where, require_pipeline=files.hub_layout)
    check_seal(doc, files)
    return doc


def check_config(doc, where, require_pipeline: bool = False) -> None:
    """Refuse a config document with unknown or missing keys, an unknown model type, or (with `require_pipeline`,
    as on the hub) without the run_config keys that tie the model to a pipeline."""
    if not isinstance(doc, dict):
        raise UserError(f"invalid model config {where}: a JSON object is expected, got {type(doc).__name__}")
    unknown = sorted(set(doc) - set(CONFIG_KEYS))
    if unknown:
        raise UserError(f"invalid model config {where}: unknown key(s) {unknown} (a golden-noise export holds "
                        f"{', '.join(CONFIG_KEYS)}): not a golden-noise export, or edited")
    if not isinstance(doc.get("model_config"), dict):
        raise UserError(f"invalid model config {where}: it has no model_config object: not a golden-noise export")
    try:
        cls = model_class(doc.get("model_type"))
    except KeyError as e:
        raise UserError(f"invalid model config {where}: {e.args[0]}") from None
    names = {f.name for f in dataclasses.fields(cls.config_class)}
    missing, extra = sorted(names - set(doc["model_config"])), sorted(set(doc["model_config"]) - names)
    if missing or extra:
        raise UserError(f"invalid model config {where}: model_config of {cls.model_type} "
                        + "; ".join(s for s in (f"lacks {missing}" if missing else "",
                                                f"has unknown key(s) {extra}" if extra else "") if s))
    run_config = doc.get("run_config")
    if require_pipeline or run_config is not None:
        check_pipeline_keys(run_config, where, require_pipeline)


def check_pipeline_keys(run_config, where, required: bool = True) -> None:
    """The run_config keys that tie a model to a pipeline: present (when `required`) and consistent (a known family,
    the latent space's fingerprint matching its fields, a known text-embedding kind)."""
    if not isinstance(run_config, dict):
        if required:
            raise UserError(f"invalid model config {where}: no run_config, so nothing ties the model to a pipeline "
                            f"(needs {', '.join(PIPELINE_KEYS)})")
        raise UserError(f"invalid model config {where}: run_config is not a JSON object")
    missing = [k for k in PIPELINE_KEYS if run_config.get(k) is None]
    if required and missing:
        raise UserError(f"invalid model config {where}: run_config lacks {missing}, which tie the model to a "
                        "pipeline: export it from a training run whose dataset records them (a current stage 2)")
    family = (run_config.get("family") or {}).get("name") if isinstance(run_config.get("family"), dict) else None
    space = run_config.get("latent_space")
    if run_config.get("family") is not None and family not in family_names():
        raise UserError(f"invalid model config {where}: run_config.family {run_config.get('family')!r} is no family "
                        f"this project knows ({', '.join(family_names())})")
    if isinstance(space, dict):
        fields = {k: v for k, v in space.items() if k != "fingerprint"}
        if space.get("fingerprint") != fingerprint(fields) or (family and space.get("family") != family):
            raise UserError(f"invalid model config {where}: run_config.latent_space does not match its fingerprint "
                            f"{space.get('fingerprint')!r} or the family {family!r}: edited or foreign")
    kind = (run_config.get("text_embedding") or {}).get("kind") if isinstance(run_config.get("text_embedding"),
                                                                              dict) else None
    if run_config.get("text_embedding") is not None and kind not in TEXT_EMBEDDINGS:
        raise UserError(f"invalid model config {where}: run_config.text_embedding.kind {kind!r} is not one of "
                        f"{', '.join(TEXT_EMBEDDINGS)}")


def check_seal(doc: dict, files: ExportFiles) -> None:
    """The config must be the one the weights were exported with: its sha256 equals the weights' `config_sha256`
    (an export made before the seal: its model_config equals the copy in the weights' metadata)."""
    meta = weights_metadata(files.weights)
    cls = model_class(doc.get("model_type"))
    if meta.get("model") not in (None, cls.model_type):
        raise UserError(f"{files.config} describes a {cls.model_type} but {files.weights.name} holds the weights of a "
                        f"{meta['model']}: the two files are from different exports")
    sealed = meta.get(SEAL)
    if sealed is not None:
        have = config_sha256(doc)
        if have != sealed:
            raise UserError(f"{files.config} does not belong to {files.weights.name}: edited after export, or the "
                            f"two files come from different exports (its sha256 {have[:12]}... differs from the "
                            f"{sealed[:12]}... sealed in the weights): restore the exported files or export again (an "
                            "edited delta_scale or num_steps would silently change every rollout)")
        return
    if "model_config" in meta and json.loads(meta["model_config"]) != doc["model_config"]:
        raise UserError(f"{files.config} does not belong to {files.weights.name}: edited after export, or the two "
                        f"files come from different exports (its model_config differs from the one recorded in the "
                        "weights): restore the exported files or export again")
    logger.warning("%s was exported before configs were sealed: an edit of its run_config cannot be detected "
                   "(re-export, or push it to the hub, which seals it)", files.weights)


# ---- save and load ------------------------------------------------------------------------------------------------
def config_document(model, extra: dict | None = None) -> dict:
    """The config document of `model` with `extra` (run_config, training), as it reads back from JSON."""
    extra = dict(extra or {})
    unknown = sorted(set(extra) - set(CONFIG_KEYS[2:]))
    if unknown:
        raise ValueError(f"an export's extra may hold {CONFIG_KEYS[2:]}, got {unknown}")
    head = {} if model.model_type == DEFAULT_MODEL_TYPE else {"model_type": model.model_type}
    return jsonable({**head, "model_config": model.config.to_dict(), **extra})


def sealed_weights(state: dict, model_type: str, doc: dict) -> bytes:
    """A weights file of the tensors `state` sealed to the config document `doc`."""
    return safetensors_bytes(state, {"format": "pt", "model": model_type,
                                     "model_config": json.dumps(doc["model_config"]), SEAL: config_sha256(doc)})


def save_export(model, stem_path: str | os.PathLike, extra: dict | None = None) -> tuple[Path, Path]:
    """Write `{stem}.safetensors` (weights, sealed) and `{stem}.json` (the config document); both atomically, the
    same bytes for the same weights and config."""
    stem = Path(stem_path)
    if stem.suffix in (".safetensors", ".json"):
        stem = stem.with_suffix("")
    weights, config = stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")
    import torch

    doc = config_document(model, extra)
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}  # integer buffers (a BatchNorm's count) keep their dtype
    blob = sealed_weights(state, model.model_type, doc)
    with atomic_path(weights) as tmp:
        tmp.write_bytes(blob)  # mode 0666 & ~umask: an export is meant to be shared
    atomic_write_json(config, doc)
    return weights, config


@dataclass
class Export:
    """A loaded export: the model (eval mode), its config document, its files and their identity."""

    model: object
    meta: dict
    files: ExportFiles

    @property
    def identity(self) -> dict:
        """What names this export in a run's settings: the weights' sha256 and the config's."""
        return {"weights_sha256": file_sha256(self.files.weights), "config_sha256": config_sha256(self.meta)}


def load_export(source: str | os.PathLike, device=None, dtype=None, revision: str | None = None,
                token: str | bool | None = None, what: str = "model") -> Export:
    """Load an export (any spelling `resolve_export` takes): the config checked strictly and against its seal, the
    model built by its model_type's class, the weights loaded strictly (no missing or unexpected tensor)."""
    from safetensors.torch import load_file

    files = resolve_export(source, revision=revision, token=token, what=what)
    doc = read_config(files)
    cls = model_class(doc.get("model_type"))
    try:
        model = cls(cls.config_class.from_dict(doc["model_config"]))
    except (ValueError, TypeError) as e:
        raise UserError(f"invalid model config {files.config}: {one_line(e)}") from None
    try:
        state = load_file(str(files.weights))
    except Exception as e:  # truncated or corrupt
        raise UserError(f"cannot load model weights {files.weights}: {one_line(e)}") from None
    misfit = _state_misfit(model.state_dict(), state)
    if misfit:
        raise UserError(f"cannot load model weights {files.weights}: they do not fit the {cls.model_type} its config "
                        f"describes ({misfit}): not the weights of this export")
    model.load_state_dict(state, strict=True)
    model.to(device=device, dtype=dtype)
    return Export(model.eval(), doc, files)


def _state_misfit(expected: dict, state: dict) -> str:
    """'' when `state` has exactly the tensors (names and shapes) of `expected`, else what differs, briefly."""
    def some(names):
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = [f"{k} {list(state[k].shape)} vs {list(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    return "; ".join(part for part in (f"missing {some(missing)}" if missing else "",
                                       f"unexpected {some(unexpected)}" if unexpected else "",
                                       f"size mismatch {some(shapes)}" if shapes else "") if part)


class ExportableModel:
    """Save/load of a noise model (an nn.Module with `model_type`, `config_class` and `config`) in the export format;
    a model class registered in golden_noise.model gets its exports through this."""

    model_type: str
    config_class: type

    def save_pretrained(self, stem_path: str | os.PathLike, extra: dict | None = None) -> tuple[Path, Path]:
        """Write `{stem}.safetensors` (weights, float32 on CPU, sealed) and `{stem}.json` ({model_config, **extra})."""
        return save_export(self, stem_path, extra)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device=None, dtype=None, revision: str | None = None):
        """Load an export (any spelling `resolve_export` takes) -> (model in eval mode, its config document)."""
        export = load_export(path, device=device, dtype=dtype, revision=revision)
        if not isinstance(export.model, cls):
            raise UserError(f"{export.files.config} holds a {export.model.model_type}, not a {cls.model_type}")
        return export.model, export.meta


# ---- the hub ------------------------------------------------------------------------------------------------------
def stage_for_hub(export: Export, folder: Path, repo_id: str, evaluation: str | os.PathLike | None = None) -> Path:
    """Write the hub layout of `export` into `folder`: model.safetensors (the export's file, byte for byte; an export
    made before the seal is sealed here, same tensors), config.json (the config document) and README.md (the
    model card)."""
    check_pipeline_keys(export.meta.get("run_config"), export.files.config, required=True)
    folder.mkdir(parents=True, exist_ok=True)
    if SEAL in weights_metadata(export.files.weights):
        shutil.copyfile(export.files.weights, folder / HUB_WEIGHTS)
    else:
        from safetensors.torch import load_file

        state = load_file(str(export.files.weights))
        (folder / HUB_WEIGHTS).write_bytes(sealed_weights(state, export.model.model_type, export.meta))
    atomic_write_json(folder / HUB_CONFIG, export.meta)
    identity = {"weights_sha256": file_sha256(folder / HUB_WEIGHTS), "config_sha256": config_sha256(export.meta)}
    atomic_write_text(folder / CARD, model_card(export.meta, identity, repo_id, evaluation))
    return folder


def push_export(export: Export | str | os.PathLike, repo_id: str, token: str | None = None,
                private: bool | None = None, evaluation: str | os.PathLike | None = None,
                commit_message: str | None = None, revision: str | None = None, what: str = "--push_to_hub") -> str:
    """Upload an export to the hub repo `repo_id` (created if needed; `private` for a new one) as model.safetensors,
    config.json and a model card README.md in one commit (pickles and other weights files left in the repo are
    removed by it). `evaluation`: a stage-6 results folder (or its summary.json) or a sweep folder (or its
    sweep.csv), summarised in the card. Returns the commit URL."""
    hub.check_repo_id(repo_id, what)
    if not isinstance(export, Export):
        export = load_export(export)
    with tempfile.TemporaryDirectory(prefix="golden-noise-push-") as tmp:
        folder = stage_for_hub(export, Path(tmp) / "repo", repo_id, evaluation)
        step = (export.meta.get("training") or {}).get("global_step")
        message = commit_message or (f"Upload {export.model.model_type}" + (f" (step {step})" if step else ""))
        return hub.upload_folder(folder, repo_id, "model", token=token, private=private, revision=revision,
                                 commit_message=message, what=what,
                                 delete_patterns=[f"*{s}" for s in hub.PICKLE_SUFFIXES] + ["*.safetensors"])
