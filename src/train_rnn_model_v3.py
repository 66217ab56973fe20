#!/usr/bin/env python
"""Stage 3: train NoiseSequenceRNN_v3 (or a one-step baseline: --model_type DirectNoiseModel / NPNet) on a golden-noise
sequence dataset (accelerate: 1..N GPUs, CPU too).

    accelerate launch src/train_rnn_model_v3.py --dataset_dir ./data/npd_sequence_dataset_sdxl/ \\
        --output_dir ./output/rnn_v3_seq_model_output/ --predict_variance --kl_weight 0.01 --mixed_precision fp16

The latent shape and text-embedding size come from the dataset's run_config.json. Rerun with
`--resume_from_checkpoint latest` to continue exactly where a run stopped. The final export is
`<output_dir>/rnn_v3_model_final.safetensors` + `.json` (model config, dataset run_config, validation);
`--push_to_hub owner/name` uploads it with a model card (GoldenNoise.from_pretrained("owner/name") loads it).
--model_type DirectNoiseModel trains the same network (the CNN and GRU flags below) to predict x'_n from x_T in one
step; --model_type NPNet trains NPNet's network (the npnet flags; needs timm). The loop lives in
golden_noise.training.trainer; its flags come from TrainingConfig, NoiseSequenceRNNConfig and NPNetConfig.
"""
from __future__ import annotations

import argparse

from golden_noise.cli import add_dataclass_arguments, dataclass_from_args, parser
from golden_noise.model.rnn_seq_model_v3 import DATA_FIELDS, NoiseSequenceRNNConfig
from golden_noise.runtime import exit_cli, gloo_launch, run_cli
from golden_noise.model.npnet import NPNetConfig
from golden_noise.training.config import ARCH_FIELDS, TrainingConfig, arch_fields, architecture, field_groups
from golden_noise.training.trainer import Trainer, done_message

GROUP_TITLES = {"data": "data", "model": "model (shape flags must agree with the dataset's run_config.json)",
                "optimisation": "optimisation", "checkpoints and logging": "checkpoints and logging",
                "hub": "Hugging Face Hub"}


def parse_args(argv=None) -> argparse.Namespace:
    p = parser(__doc__)
    groups = field_groups()
    for name, title in GROUP_TITLES.items():
        g = p.add_argument_group(title)
        fields = groups[name]
        if name == "model":  # the shape checks, the architecture, then the flags accepted for compatibility
            add_dataclass_arguments(g, TrainingConfig, include=[f for f in fields if f in DATA_FIELDS])
            add_dataclass_arguments(g, NoiseSequenceRNNConfig, include=ARCH_FIELDS)
            fields = [f for f in fields if f not in DATA_FIELDS]
        add_dataclass_arguments(g, TrainingConfig, include=fields)
    add_dataclass_arguments(p.add_argument_group("model: npnet (with --model_type NPNet; defaults: NPNet's released "
                                                 "SDXL model)"), NPNetConfig, include=arch_fields(NPNetConfig))
    args = p.parse_args(argv)  # the flags' ranges are their fields' (TrainingConfig, NoiseSequenceRNNConfig)
    if args.resume_fallback and args.resume_from_checkpoint != "latest":
        p.error("--resume_fallback needs --resume_from_checkpoint latest")
    try:
        fields = ARCH_FIELDS if args.model_type != "NPNet" else arch_fields(NPNetConfig)
        args.arch = architecture(args.model_type, **{k: getattr(args, k) for k in fields})
    except (ValueError, ImportError) as e:
        p.error(f"invalid model flags: {e}")
    return args


def main(args: argparse.Namespace) -> dict:
    trainer = Trainer(dataclass_from_args(TrainingConfig, args), args.arch)
    summary = trainer.run()
    if trainer.export_paths is not None:  # the main process
        print(done_message(summary, trainer.export_paths[0]))
    return summary


if __name__ == "__main__":
    exit_cli(run_cli(main, parse_args), skip_teardown=gloo_launch())
