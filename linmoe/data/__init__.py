"""Data pipeline: read documents, tokenize, pack and serve resumable batches."""

from linmoe.data.dataset import PackedDataset
from linmoe.data.errors import DataError
from linmoe.data.grain_loader import GrainDataset, GrainStream
from linmoe.data.packing import (pack_documents, segment_ids, split_documents,
                                 split_indices)
from linmoe.data.pipeline import LOADERS, Data, build_data
from linmoe.data.readers import ReadStats, read_documents
from linmoe.data.sources import Documents, load_documents
from linmoe.data.stream import BatchStream, IndexStream
from linmoe.data.tokenizers import (NAMED_TOKENIZERS, ByteTokenizer,
                                    HFTokenizer, QwenTokenizer, Tokenizer,
                                    build_tokenizer)

__all__ = [
    "BatchStream",
    "ByteTokenizer",
    "Data",
    "DataError",
    "Documents",
    "GrainDataset",
    "GrainStream",
    "HFTokenizer",
    "IndexStream",
    "LOADERS",
    "NAMED_TOKENIZERS",
    "PackedDataset",
    "QwenTokenizer",
    "ReadStats",
    "Tokenizer",
    "build_data",
    "build_tokenizer",
    "load_documents",
    "pack_documents",
    "read_documents",
    "segment_ids",
    "split_documents",
    "split_indices",
]
