"""Foreign token data read as our shards are: files written by the other tools themselves
(datatrove's DocumentTokenizer and MegatronDocumentTokenizer run on a small corpus with OPT's
tokenizer; HF `datasets` save_to_disk), and malformed files refused naming the file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.formats import FormatError, ReadOptions, detect, open_split, verify_data
from data_pipeline.formats import megatron as meg
from data_pipeline.formats.split_rule import is_validation, validation_by_index
from data_pipeline.shards import ShardWriter
from data_pipeline.tokenizer import Tokenizer, TokenizerSpec

OPT_EOS = 2
TEXTS = [
    f"Document {i} tells of {['rivers', 'cities', 'engines', 'birds'][i % 4]}"
    + " and more" * (i % 9)
    + "."
    for i in range(80)
]


def hf_tokenizer_file(opt_tokenizer_dir: Path, out: Path) -> Path:
    """OPT's BPE as a `tokenizers` JSON (datatrove loads a tokenizer from such a file): the
    published vocab.json/merges.txt with GPT-2's byte-level pre-tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(
        models.BPE.from_file(str(opt_tokenizer_dir / "vocab.json"),
                             str(opt_tokenizer_dir / "merges.txt"))
    )  # fmt: skip
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    path = out / "opt-tokenizer.json"
    tok.save(str(path))
    return path


def encode_all(tokenizer_file: Path) -> list[list[int]]:
    from tokenizers import Tokenizer

    return [e.ids for e in Tokenizer.from_file(str(tokenizer_file)).encode_batch(TEXTS)]


def run_datatrove(out: Path, tokenizer_file: Path) -> dict[str, Path]:
    """TEXTS through datatrove's own writers (LocalPipelineExecutor, one task): `.ds` files
    without separators, shuffled (DocumentTokenizer's default), and Megatron files with `</s>`
    after every document."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer, MegatronDocumentTokenizer

    corpus = out / "corpus"
    corpus.mkdir()
    with open(corpus / "docs.jsonl", "w") as f:
        for i, text in enumerate(TEXTS):
            f.write(json.dumps({"text": text, "id": f"doc-{i}"}) + "\n")
    writers = {
        "ds": DocumentTokenizer(str(out / "ds"), str(tokenizer_file), seed=5),
        "megatron": MegatronDocumentTokenizer(
            str(out / "megatron"), tokenizer_name_or_path=str(tokenizer_file), eos_token="</s>"
        ),
    }
    for name, writer in writers.items():
        LocalPipelineExecutor(
            [JsonlReader(str(corpus)), writer], tasks=1, logging_dir=str(out / f"logs-{name}")
        ).run()
    return {name: out / name for name in writers}


@pytest.fixture(scope="session")
def datatrove_written(tmp_path_factory, opt_tokenizer_dir) -> dict:
    """TEXTS encoded, and the paths of datatrove's `.ds` and Megatron outputs: written once a
    session (tests/opt_train/test_foreign_data.py trains on them too)."""
    out = tmp_path_factory.mktemp("foreign")
    tokenizer_file = hf_tokenizer_file(opt_tokenizer_dir, out)
    return {"encoded": encode_all(tokenizer_file), **run_datatrove(out, tokenizer_file)}


@pytest.fixture
def written(datatrove_written) -> dict:
    return datatrove_written


def all_documents(path: Path, options: ReadOptions) -> tuple[list, list]:
    return tuple(
        [d.tolist() for d in open_split(path, s, options).documents()]
        for s in ("train", "validation")
    )


def stream_of(docs: list[list[int]]) -> np.ndarray:
    return np.array([t for d in docs for t in [*d, OPT_EOS]], dtype=np.int64)


OPT = ReadOptions("opt", 0.2)


def test_datatrove_ds_files_read_as_datatrove_wrote_them_with_separators_appended(written):
    from datatrove.utils.dataset import DatatroveFolderDataset

    path = written["ds"]
    assert detect(path) == "datatrove"
    # What datatrove wrote, read by datatrove: the whole file as one window, cut at its index.
    (ds_file,) = sorted(path.glob("*.ds"))
    n = ds_file.stat().st_size // 2
    stream = DatatroveFolderDataset(str(path), seq_len=n - 1)[0]["input_ids"].numpy()
    ends = np.fromfile(str(ds_file) + ".index", dtype=np.uint64).astype(int)
    theirs = [stream[a:b].tolist() for a, b in zip([0, *ends[:-1]], ends, strict=True)]
    assert sorted(theirs) == sorted(written["encoded"]) and theirs != written["encoded"]
    train, val = all_documents(path, OPT)
    held = validation_by_index(0, len(theirs), 0.2, 0)
    assert 0 < len(val) < len(train)
    assert train == [d for d, h in zip(theirs, held, strict=True) if not h]
    assert val == [d for d, h in zip(theirs, held, strict=True) if h]
    # datatrove wrote no separator: the loader's stream has `</s>` after every document.
    reader = open_split(path, "train", OPT)
    stream = stream_of(train)
    assert np.array_equal(reader.read(0, reader.num_tokens), stream)
    for start in range(0, len(stream) - 40, 3):  # windows starting anywhere in a document
        assert np.array_equal(reader.read(start, 40), stream[start : start + 40])
    assert reader.manifest["vocab_size"] == 50265 and reader.manifest["eos_id"] == OPT_EOS


def test_megatron_files_read_as_written_their_own_separators_kept_zero_copy(written):
    path = written["megatron"]
    (prefix,) = [p.with_suffix("") for p in path.glob("*.idx")]
    for given in (path, prefix, prefix.with_suffix(".bin")):
        assert detect(given) == "megatron"
    train, val = all_documents(path, ReadOptions("opt", 0.0))
    assert val == [] and train == written["encoded"]  # in corpus order, `</s>` not doubled
    whole = open_split(prefix, "train", ReadOptions("opt", 0.0))
    assert whole.parts[0].plain  # every document ends in </s>: reads are slices of the memmap
    assert isinstance(whole.parts[0].file.tokens, np.memmap)
    assert np.array_equal(whole.read(0, whole.num_tokens), stream_of(written["encoded"]))
    assert np.array_equal(whole.read(5, 40), stream_of(written["encoded"])[5:45])
    # With documents held out, reads within adjacent kept documents are slices, the others
    # gathered: every read is the kept documents' stream either way.
    train = open_split(path, "train", OPT)
    held = validation_by_index(0, len(written["encoded"]), 0.2, 0)
    stream = stream_of([d for d, h in zip(written["encoded"], held, strict=True) if not h])
    assert train.num_tokens == len(stream)
    for start in range(0, len(stream) - 40, 3):
        assert np.array_equal(train.read(start, 40), stream[start : start + 40])


def test_hf_saved_dataset_splits_by_the_tokenize_stages_id_rule(tmp_path, written):
    import datasets

    ids = [f"doc-{i}" for i in range(len(TEXTS))]
    path = tmp_path / "hf"
    data = {"input_ids": written["encoded"], "id": ids, "text": TEXTS}
    datasets.Dataset.from_dict(data).save_to_disk(str(path), max_shard_size="2KB")
    assert len(list(path.glob("*.arrow"))) > 1  # several Arrow files, read in order
    assert detect(path) == "hf"
    train, val = all_documents(path, OPT)
    held = [is_validation(i, 0.2, 0) for i in ids]  # as `python -m data_pipeline.tokenize`
    assert val == [d for d, h in zip(written["encoded"], held, strict=True) if h]
    assert train == [d for d, h in zip(written["encoded"], held, strict=True) if not h]
    reader = open_split(path, "train", OPT)
    assert np.array_equal(reader.read(0, reader.num_tokens), stream_of(train))


def test_hf_dataset_dict_keeps_its_own_validation_split(tmp_path, written):
    import datasets

    enc = written["encoded"]
    path = tmp_path / "hfdict"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"input_ids": enc[:70]}),
         "validation": datasets.Dataset.from_dict({"input_ids": enc[70:]})}
    ).save_to_disk(str(path))  # fmt: skip
    assert all_documents(path, OPT) == (enc[:70], enc[70:])


def test_our_shards_keep_their_record_and_a_contradicting_declaration_is_refused(
    tmp_path, opt_tokenizer_dir
):
    # The record `python -m data_pipeline.tokenize tokenizer.name=opt tokenizer.path=...` writes.
    tok = Tokenizer(TokenizerSpec("opt", str(opt_tokenizer_dir))).describe()
    with ShardWriter(tmp_path / "s", tok) as w:
        w.add(np.arange(5, 30))
    assert detect(tmp_path / "s") == "opt-train"
    for declared in ("opt", str(opt_tokenizer_dir)):
        assert open_split(tmp_path / "s", "train", ReadOptions(declared)).num_tokens == 26
    with pytest.raises(FormatError, match=r"s: data.tokenizer=gpt2 declares 'gpt2'.*'opt'"):
        open_split(tmp_path / "s", "train", ReadOptions("gpt2"))


def test_foreign_data_without_a_declared_tokenizer_is_refused(written):
    with pytest.raises(FormatError, match="declare it with data.tokenizer=gpt2 | opt"):
        open_split(written["megatron"], "train", ReadOptions(None))


# Bad input: each refused naming the file.


def copy_megatron(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return next(dst.glob("*.idx"))


def test_truncated_megatron_index_is_refused_naming_it(tmp_path, written):
    idx = copy_megatron(written["megatron"], tmp_path / "m")
    idx.write_bytes(idx.read_bytes()[:-8])
    with pytest.raises(FormatError, match=rf"{idx}: \d+ bytes, but its header .* truncated"):
        open_split(tmp_path / "m", "train", OPT)


def test_unknown_megatron_dtype_code_is_refused_naming_it(tmp_path, written):
    idx = copy_megatron(written["megatron"], tmp_path / "m")
    raw = bytearray(idx.read_bytes())
    raw[17] = 11  # the dtype code follows the 9-byte magic and the uint64 version
    idx.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match=rf"{idx}: unknown dtype code 11"):
        open_split(tmp_path / "m", "train", OPT)


def test_megatron_bin_shorter_than_its_index_is_refused(tmp_path, written):
    idx = copy_megatron(written["megatron"], tmp_path / "m")
    binf = idx.with_suffix(".bin")
    binf.write_bytes(binf.read_bytes()[:-2])
    with pytest.raises(FormatError, match=rf"{binf}: \d+ bytes, but .* describes"):
        open_split(tmp_path / "m", "train", OPT)


def test_ids_beyond_the_declared_vocabulary_are_refused_naming_file_and_document(tmp_path):
    prefix = tmp_path / "m" / "big"
    prefix.parent.mkdir()
    docs = [np.array([5, 6, 7, 2]), np.array([8, 50260, 9, 2])]  # an OPT id, not a GPT-2 one
    np.concatenate(docs).astype(np.uint16).tofile(str(prefix) + ".bin")
    meg.write_index(Path(str(prefix) + ".idx"), np.uint16, np.array([4, 4]))
    verify_data(prefix, ReadOptions("opt", 0.0))  # OPT's 50,265 ids hold it
    with pytest.raises(FormatError, match=r"big.bin: token id 50260 .*document 1.*\[0, 50257\)"):
        verify_data(prefix, ReadOptions("gpt2", 0.0))


def test_a_directory_of_mixed_formats_is_refused_naming_a_file_of_each(tmp_path, written):
    mixed = tmp_path / "mixed"
    copy_megatron(written["megatron"], mixed)
    for f in written["ds"].iterdir():
        (mixed / f.name).write_bytes(f.read_bytes())
    with pytest.raises(FormatError, match=r"several formats \(datatrove: .*\.ds; megatron: "):
        detect(mixed)


def test_datatrove_file_disagreeing_with_its_index_or_metadata_is_refused(tmp_path, written):
    d = tmp_path / "ds"
    d.mkdir()
    for f in written["ds"].iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (ds,) = d.glob("*.ds")
    ds.write_bytes(ds.read_bytes()[:-4])
    with pytest.raises(FormatError, match=rf"{ds}: \d+ tokens, but its .metadata says"):
        open_split(d, "train", OPT)
    ds.with_name(ds.name + ".metadata").unlink()
    with pytest.raises(FormatError, match=rf"{ds}.index: document ends must rise to the"):
        open_split(d, "train", OPT)


def test_megatron_header_layout_matches_the_published_one(tmp_path):
    """Our writer's header, field by field, as Megatron-LM's reader unpacks it."""
    idx = tmp_path / "x.idx"
    meg.write_index(idx, np.uint16, np.array([3, 1, 4]))
    raw = idx.read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack("<QBQQ", raw[9:34]) == (1, 8, 3, 4)
    assert np.frombuffer(raw[34:46], "<i4").tolist() == [3, 1, 4]
    assert np.frombuffer(raw[46:70], "<i8").tolist() == [0, 6, 8]
    assert np.frombuffer(raw[70:], "<i8").tolist() == [0, 1, 2, 3]
