"""The stage-3 dataset (the user's `src/dataset.py`): re-exports `golden_noise.sequence_data`."""
from golden_noise.sequence_data import (  # noqa: F401
    SampleRow, SequenceData, SequenceDataset, collate, golden_change_rms, load_run_config, open_dataset,
    read_metadata, split_ids,
)

__all__ = ["SampleRow", "SequenceData", "SequenceDataset", "collate", "golden_change_rms", "load_run_config",
           "open_dataset", "read_metadata", "split_ids"]
