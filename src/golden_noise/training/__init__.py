"""Stage 3: config.py (TrainingConfig, the architecture fields), trainer.py (Trainer: the loop), checkpoints.py
(find, verify, prune), core.py (data order, losses, the warmup-cosine rule, validation summaries)."""
