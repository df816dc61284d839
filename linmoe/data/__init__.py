"""Data pipeline: read documents, tokenize, pack and serve resumable batches."""

from linmoe.data.dataset import PackedDataset
from linmoe.data.errors import DataError
from linmoe.data.packing import pack_documents, split_documents
from linmoe.data.pipeline import Data, build_data
from linmoe.data.readers import ReadStats, read_documents
from linmoe.data.tokenizers import (ByteTokenizer, HFTokenizer, Tokenizer,
                                    build_tokenizer)

__all__ = [
    "ByteTokenizer",
    "Data",
    "DataError",
    "HFTokenizer",
    "PackedDataset",
    "ReadStats",
    "Tokenizer",
    "build_data",
    "build_tokenizer",
    "pack_documents",
    "read_documents",
    "split_documents",
]
