"""DATA: dataset layouts -> WebDataset shards on any fsspec URL -> equal, resumable streams of batches.

Import the modules themselves (`shards.stream`, `shards.errors`, ...): this package imports nothing, so
`shards.errors` stays light for every layer that raises or catches its errors.
"""
