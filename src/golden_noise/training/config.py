"""What a stage-3 training run is given: `TrainingConfig` (data, optimisation, checkpoints, which model) and the
architecture (the model type's config dataclass: `NoiseSequenceRNNConfig` for NoiseSequenceRNN_v3 and
DirectNoiseModel, `NPNetConfig` for NPNet, whose data fields the trainer takes from the dataset). The CLI's flags are
generated from them, so every default is written once."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..cli import check_fields, rerun_keys, setting
from ..model import DEFAULT_MODEL_TYPE, MODEL_TYPES, model_class
from ..model.npnet import DATA_FIELDS as NPNET_DATA_FIELDS, NPNetConfig
from ..model.rnn_seq_model_v3 import DATA_FIELDS, NoiseSequenceRNNConfig

# the architecture: every model config field that does not describe the data
ARCH_FIELDS = tuple(f.name for f in fields(NoiseSequenceRNNConfig) if f.name not in DATA_FIELDS)
MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16")
# accelerate's set_seed seeds numpy, whose seeds are 32-bit, with seed + process index: leave room for the processes
TRAINING_SEED_RULES = {"min": 0, "max": 2 ** 31 - 1}
MODEL_TYPE_HELP = ("the model (golden_noise.model): NoiseSequenceRNN_v3 (rolled out n steps: gnsnet), "
                   "DirectNoiseModel (the same network predicting x'_n from x_T in one step, no recurrence: direct) or "
                   "NPNet (NPNet's network, one step: npnet; needs timm)")


def _f(default, group: str, text: str, **rules):
    """A TrainingConfig field: its default, its --help group and text, and its rules (golden_noise.cli.setting)."""
    return setting(default, text, group=group, **rules)


@dataclass
class TrainingConfig:
    """Data, optimisation, checkpoint and logging settings of a training run (each is the flag of that name).

    `rerun=True` marks the settings that shape the trained weights: resuming (or rerunning into the same
    --output_dir) with another value of one of them is refused. The run's length (--num_epochs,
    --max_train_steps), checkpointing, logging and the loader's worker count may change."""

    dataset_dir: str = _f("./data/npd_sequence_dataset_sdxl/", "data",
                          "dataset written by generate_npd_series.py (run_config.json, index.json, data/*.parquet; "
                          "an older one of loose files too), or a hub dataset id owner/name (scripts/push_dataset.py)",
                          rerun=True)
    output_dir: str = _f("./output/rnn_v3_seq_model_output/", "data",
                         "checkpoints, tensorboard logs, validation.json and the final export")
    validation_fraction: float = _f(0.1, "data", "fraction of sample ids held out for validation (deterministic "
                                    "split by id)", min=0, below=1, rerun=True)
    max_seq_len: int | None = _f(None, "data", "train on the first N golden steps only", min=1,
                                  rerun=True)
    skip_bad_samples: bool = _f(False, "data", "skip (and count) samples with missing, damaged or corrupt files "
                                "instead of stopping", rerun=True)
    min_reward_gain: float | None = _f(None, "data", "train only on samples whose recorded reward_gain (reward of "
                                       "the image from x'_n minus that from x_T: generate_npd_series.py "
                                       "--score_metric) is >= X, NPNet's filter; the validation split is unchanged",
                                       rerun=True)
    train_fraction: float = _f(1.0, "data", "train on this fraction of the training samples, chosen by a hash of the "
                               "sample id (deterministic; a smaller fraction's samples are in every larger one's); "
                               "the validation split is unchanged", above=0, max=1, rerun=True)
    dataloader_num_workers: int = _f(2, "data", "data-loading worker processes per GPU", min=0)
    model_type: str = _f(DEFAULT_MODEL_TYPE, "model", MODEL_TYPE_HELP, choices=tuple(MODEL_TYPES), rerun=True)
    noise_resolution: int | None = _f(None, "model", "H = W of the noise; default and check: the dataset's "
                                      "latent_shape", min=1)
    text_embed_dim: int | None = _f(None, "model", "text-embedding size; default and check: the dataset's "
                                    "text_embedding.dim", min=1)
    base_model_id: str | None = _f(None, "model", "accepted for compatibility: the base model is the one recorded "
                                   "in run_config.json")
    npnet_model_id: str | None = _f(None, "model", "accepted for compatibility; not used by this model")
    kl_weight: float = _f(0.0, "optimisation", "weight of KL(predicted Gaussian || N(0, I)) (default: 0, off)",
                          min=0, rerun=True)
    num_epochs: int = _f(50, "optimisation", "epochs (ignored when --max_train_steps is set)", min=1)
    max_train_steps: int | None = _f(None, "optimisation", "optimizer steps in total; overrides --num_epochs", min=1)
    batch_size: int = _f(8, "optimisation", "samples per device per micro-batch", min=1, rerun=True)
    gradient_accumulation_steps: int = _f(1, "optimisation", "micro-batches per optimizer step", min=1,
                                          rerun=True)
    learning_rate: float = _f(1e-4, "optimisation", "peak AdamW learning rate", above=0, rerun=True)
    weight_decay: float = _f(1e-2, "optimisation", "AdamW weight decay", min=0, rerun=True)
    adam_beta1: float = _f(0.9, "optimisation", "AdamW beta1", min=0, below=1, rerun=True)
    adam_beta2: float = _f(0.999, "optimisation", "AdamW beta2", min=0, below=1, rerun=True)
    lr_warmup_steps: int | None = _f(None, "optimisation", "linear warmup steps before the cosine decay "
                                     "(default: 5%% of the steps, at most 500)", min=0, rerun=True)
    max_grad_norm: float = _f(1.0, "optimisation", "gradient clipping norm (0: no clipping)", min=0,
                              rerun=True)
    mixed_precision: str | None = _f(None, "optimisation", "autocast precision (default: accelerate launch "
                                     "--mixed_precision or the accelerate config, else no; fp16 needs a GPU, on "
                                     "CPU it trains in float32)", choices=MIXED_PRECISION_CHOICES,
                                     rerun=True)
    seed: int = _f(42, "optimisation", "seed of the model init, the data order and dropout", rerun=True,
                   **TRAINING_SEED_RULES)
    save_steps: int = _f(1000, "checkpoints and logging", "save a resumable checkpoint-{step} every N steps", min=1)
    max_checkpoints: int = _f(3, "checkpoints and logging", "keep only the newest N checkpoints (0: keep all)",
                              min=0)
    resume_from_checkpoint: str | None = _f(None, "checkpoints and logging", "'latest' or a checkpoint-{step} "
                                            "folder; a damaged checkpoint is an error naming its file")
    resume_fallback: bool = _f(False, "checkpoints and logging", "with --resume_from_checkpoint latest: when the "
                               "newest checkpoint is damaged, resume from the newest intact one (and set the "
                               "damaged ones aside as damaged-checkpoint-{step})")
    validation_steps: int = _f(500, "checkpoints and logging", "validate every N steps (and always at the end; "
                               "each validation draws one number from the generator dropout uses)", min=0,
                               rerun=True)
    logging_steps: int = _f(10, "checkpoints and logging", "log the training losses every N steps", min=1)
    report_to: str = _f("tensorboard", "checkpoints and logging", "experiment tracker",
                        choices=("tensorboard", "none"))
    push_to_hub: str | None = _f(None, "hub", "after training, upload the final export to this Hugging Face model "
                                 "repo (owner/name; created if needed) as model.safetensors + config.json + a "
                                 "generated model card README.md")
    hub_token: str | None = _f(None, "hub", "Hugging Face token with write access for --push_to_hub (default: the "
                               "one `hf auth login` saved, or HF_TOKEN); never recorded")
    hub_private_repo: bool = _f(False, "hub", "with --push_to_hub: create the repo private (an existing repo keeps "
                                "its visibility)")

    def check(self) -> "TrainingConfig":
        """A UserError naming the flag of a value out of range (the CLI checks the same rules when parsing)."""
        check_fields(self)
        return self

    # where the export goes, not what it is: not recorded (the token is a secret), so pushing leaves the bytes alone
    NOT_RECORDED = ("push_to_hub", "hub_token", "hub_private_repo")

    def record(self, arch) -> dict:
        """Every setting of the run that shapes its export, flat and in flag order: what checkpoints and the export
        record as `args`."""
        return {**{k: v for k, v in asdict(self).items() if k not in self.NOT_RECORDED},
                **{k: getattr(arch, k) for k in arch_fields(type(arch))}}


# what a resumed run must keep: the byte-shaping settings above and the architecture (of NoiseSequenceRNN_v3's
# config; `resume_keys` for any model type's)
RESUME_KEYS = (*rerun_keys(TrainingConfig), *ARCH_FIELDS)


def resume_keys(arch) -> tuple[str, ...]:
    """What a resumed run with the model config `arch` must keep: TrainingConfig's rerun fields and its architecture."""
    return (*rerun_keys(TrainingConfig), *arch_fields(type(arch)))


def field_groups(cls=TrainingConfig) -> dict[str, list[str]]:
    """{--help group: [field names]} of TrainingConfig, in field order."""
    groups: dict[str, list[str]] = {}
    for f in fields(cls):
        groups.setdefault(f.metadata["group"], []).append(f.name)
    return groups


def data_fields(cls) -> tuple[str, ...]:
    """The fields of a model config dataclass that the trainer sets from the dataset."""
    return NPNET_DATA_FIELDS if cls is NPNetConfig else DATA_FIELDS


def arch_fields(cls) -> tuple[str, ...]:
    """The architecture fields of a model config dataclass: every field that does not describe the data."""
    return tuple(f.name for f in fields(cls) if f.name not in data_fields(cls))


def architecture(model_type: str = DEFAULT_MODEL_TYPE, **values):
    """The model config of `model_type` from its architecture fields (`arch_fields`) only; the trainer sets the data
    fields from the dataset. For the CNN models, noise_resolution stands in until then: the smallest one the encoder
    stages accept."""
    cls = model_class(model_type).config_class
    unknown = sorted(set(values) - set(arch_fields(cls)))
    if unknown:
        raise ValueError(f"not architecture fields of {model_type}: {unknown}")
    if cls is NoiseSequenceRNNConfig:
        stages = len(values.get("cnn_num_blocks") or NoiseSequenceRNNConfig().cnn_num_blocks)
        return NoiseSequenceRNNConfig(noise_resolution=2 ** max(0, stages - 1), **values)
    return cls(**values)
