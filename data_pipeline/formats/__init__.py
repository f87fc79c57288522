"""Token data in other tools' formats, read as our shards are read and written for them.

`data.path` (and each `data.sources[].path`) may name, detected from the files (`detect`):

- our shard directory (`manifest.json`, data_pipeline/shards.py);
- a directory of datatrove `.ds` files with their `.ds.index` (datatrove's `DocumentTokenizer`,
  what nanotron reads): `datatrove.py`;
- a Megatron `.bin`/`.idx` prefix or a directory of them (Megatron's `preprocess_data.py`,
  datatrove's `MegatronDocumentTokenizer`, NeMo Curator): `megatron.py`;
- a dataset saved by HF `datasets` (`save_to_disk`) with an `input_ids` column: `hf_saved.py`.

`open_split` gives the loader one split of any of them with the interface of
`data_pipeline.shards.SplitReader` (`foreign.py`). The tokenizer of foreign data is declared
(`declared.py`); the train/validation split of foreign data follows `split_rule.py`.
Imports only shards, files, ownership and tokenizer (the shared layer).
"""

from data_pipeline.formats.declared import same_tokenizer
from data_pipeline.formats.detect import (
    FOREIGN,
    ReadOptions,
    detect,
    open_split,
    split_tokens,
    verify_data,
)
from data_pipeline.formats.foreign import FormatError

__all__ = [
    "FOREIGN",
    "FormatError",
    "ReadOptions",
    "detect",
    "open_split",
    "same_tokenizer",
    "split_tokens",
    "verify_data",
]
