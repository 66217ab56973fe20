"""The golden-noise sequence dataset: stage 2 writes it, stage 3 reads it.

`format` names its files (the sharded format 2 and the loose files of format 1), `writer` writes staging files and
seals them into shards, `reader` is the training reader of both formats, `generate` is stage 2 (the generator),
`convert` turns a format-1 dataset into format 2, `hub` pushes a dataset to the Hugging Face Hub and resolves a hub
dataset id for training.
"""
