"""The golden-noise sequence dataset: stage 2 writes it, stage 3 reads it.

`format` names its files (the sharded format 2 and the loose files of format 1); `shards` reads a shard's row groups
and says which shards are sealed and intact; `writer` writes stage 2's staging files and seals them into shards;
`reader` is the training reader of both formats (a hub dataset id too); `generate` is stage 2, the generator;
`card` writes the dataset card; `convert` turns a format-1 dataset into format 2; `hub` pushes a dataset to the
Hugging Face Hub.
"""
