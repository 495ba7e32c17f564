"""Data for pre-training: corpus discovery, byte-level BPE tokenizer, token shards, samplers.

The trainer needs only `DataConfig`, `prepare_data` and the `PreparedData` it returns::

    data = prepare_data(cfg.data, out_dir)
    batches = data.train_sampler(batch_size, seq_len, seed)   # next(batches) -> LongTensor [B, T+1]
    for batch in data.val_batches(batch_size, seq_len, max_batches=20): ...
    tokenizer = data.load_tokenizer()
"""

from frugalm.data.chat_template import CHAT_TEMPLATE, ChatTemplateError, render_chat
from frugalm.data.config import DataConfig
from frugalm.data.corpus import Corpus, Document
from frugalm.data.errors import DataError
from frugalm.data.prepare import PreparedData, prepare_data
from frugalm.data.sampler import TrainSampler, ValBatches
from frugalm.data.shards import TokenSplit, verify_shards
from frugalm.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "CHAT_TEMPLATE", "ChatTemplateError", "Corpus", "DataConfig", "DataError", "Document", "PreparedData",
    "TokenSplit", "Tokenizer", "TrainSampler", "ValBatches", "load_tokenizer", "prepare_data", "render_chat",
    "train_tokenizer", "verify_shards",
]
