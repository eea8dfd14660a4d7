"""DATA: dataset layouts -> WebDataset shards on any fsspec URL -> equal, resumable streams of batches."""
from .errors import BadInput, StorageFailure
from .stream import ShardStream, StreamSpec, open_stream

__all__ = ["BadInput", "ShardStream", "StreamSpec", "StorageFailure", "open_stream"]
