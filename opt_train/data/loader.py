"""Training data: token shards -> packed windows in a deterministic, resumable global order.

The split's shards form one token stream (documents separated by `</s>`), cut into windows of
`seq_len + 1` tokens that overlap by one (inputs are the first `seq_len`, targets the last).
The order of windows is a permutation per epoch drawn from the seed alone, and a global batch is
a run of consecutive positions in that order; rank r of W takes the r-th slice of each global
batch. So the samples a step sees depend on the seed and the step, never on the world size, and
the loader's whole state is one number: how many samples the run has consumed.

A mixture (`data.sources`) is several such splits: opt_train/data/mixture.py decides, from the
global sample number alone, which source each sample comes from (each source's share exact to
less than one sample at every point of the run), and each source has its own seeded permutation
per pass.
The state is still that one number (plus the tokens each source supplied, for the metrics).

`skip_steps` ranges (`data.skip_steps`) name optimizer steps of the original order whose global
batches are passed over; skipping moves that number forward, so it is as deterministic and as
world-size independent as the order itself.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_pipeline.formats import ReadOptions, open_split, same_tokenizer, split_tokens, verify_data
from opt_train.data.mixture import Mixture, resolve_weights

log = logging.getLogger(__name__)


class BadTokenIds(ValueError):
    """A batch holds token ids outside the shards' vocabulary (a flipped bit, a shard made with
    another tokenizer): the embedding would fail with an IndexError on CPU and a device-side
    assert on CUDA that leaves the other ranks waiting. Raised on every rank at the same point."""


def bad_tokens_error(step: int, bad_here: list[str], bad_ranks: int, vocab: int) -> BadTokenIds:
    """The error every rank raises after an out-of-vocabulary id on any of `bad_ranks` ranks;
    the ranks that read one (`bad_here`, from `GlobalOrderLoader.bad_tokens`) name the shard
    file and document."""
    if bad_here:
        shown = "; ".join(bad_here[:5]) + ("; ..." if len(bad_here) > 5 else "")
        return BadTokenIds(
            f"step {step}: {len(bad_here)} token id(s) outside the vocabulary "
            f"[0, {vocab}) in this rank's batch: {shown}. The shard is corrupt or was "
            "made with another tokenizer; data.verify=true re-checks its hashes, "
            "data.skip_steps passes over this step's batch."
        )
    return BadTokenIds(
        f"step {step}: token ids outside the vocabulary [0, {vocab}) on "
        f"{bad_ranks} other rank(s); their errors name the shard and document"
    )


def resolve_data_path(path: str | None, cache_dir: str) -> Path:
    """`data.path`, or the embedded tiny corpus (built once into `cache_dir`) when unset."""
    if path:
        return Path(path).expanduser()
    from data_pipeline.tiny_corpus import build_tiny_shards

    return build_tiny_shards(Path(cache_dir).expanduser() / "tiny-corpus")


class PackedWindows:
    """Fixed-length windows over one split's token stream (our shards or foreign token data:
    data_pipeline/formats, read through `options`)."""

    def __init__(
        self, path: str | Path, split: str, seq_len: int, options: ReadOptions | None = None
    ):
        self.reader = open_split(path, split, options)
        self.split = split
        self.seq_len = seq_len
        self.num_windows = (self.reader.num_tokens - 1) // seq_len
        if self.num_windows < 1:
            raise ValueError(
                f"{path}: split {split!r} has {self.reader.num_tokens} tokens, fewer than one "
                f"window of data.seq_len + 1 = {seq_len + 1}"
            )

    def __len__(self) -> int:
        return self.num_windows

    def window(self, i: int) -> np.ndarray:
        return self.reader.read(i * self.seq_len, self.seq_len + 1)

    def locate(self, pos: int) -> str:
        """Where token `pos` of the split's stream is stored: shard file, document, offset."""
        r = self.reader
        if hasattr(r, "locate"):  # foreign data: its files and appended separators
            return r.locate(pos)
        s = int(np.searchsorted(r.starts, pos, side="right")) - 1
        local = pos - int(r.starts[s])
        doc = int(np.searchsorted(r.indexes[s], local, side="right")) - 1
        name = r.manifest["splits"][self.split]["shards"][s]["tokens"]
        return (
            f"{r.path / name}, document {doc} (token {local - int(r.indexes[s][doc])} of it, "
            f"byte offset {local * r.dtype.itemsize})"
        )


def out_of_vocab(rows: np.ndarray, vocab_size: int) -> bool:
    """Whether any id in `rows` (int64) is outside [0, vocab_size), in one reduction: viewed as
    unsigned, a negative id is larger than any vocabulary."""
    return bool(rows.size) and int(rows.view(np.uint64).max()) >= vocab_size


def describe_bad_ids(
    rows: np.ndarray, picks: Sequence[tuple[PackedWindows, int]], vocab_size: int
) -> list[str]:
    """Each out-of-range id of `rows` (row r is window picks[r][1] of picks[r][0]) with the
    shard file and document it came from."""
    found = []
    for row, (windows, w) in zip(rows, picks, strict=True):
        for k in np.flatnonzero((row < 0) | (row >= vocab_size)).tolist():
            where = windows.locate(w * windows.seq_len + k)
            found.append(f"id {int(row[k])} at {where}")
    return found


@dataclass
class Source:
    """One shard set of the training mixture. `name` is None for the `data.path` shorthand
    (its metrics keep the one-source form: no per-source keys)."""

    name: str | None
    windows: PackedWindows
    weight: float = 1.0

    def rng_key(self) -> list[int]:
        """Entropy for this source's permutations besides seed and epoch: its name's hash, so
        each source has its own order, unchanged when the list is reordered or reweighted."""
        if self.name is None:
            return []
        return [int.from_bytes(hashlib.blake2b(self.name.encode(), digest_size=8).digest())]


class GlobalOrderLoader:
    """Rank `rank`'s micro-batches of each global batch, in the seed's global order.

    `data` is one split's windows, or the sources of a mixture (opt_train/data/mixture.py decides
    which source global sample n comes from; source i's j-th sample is position j of its own
    seeded permutation, one per pass over it). `exhaust="stop"` makes `has_next()` false before
    the first global batch that would start a source over."""

    def __init__(
        self,
        data: PackedWindows | Sequence[Source],
        seed: int,
        global_batch: int,
        micro_batch: int,
        rank: int = 0,
        world: int = 1,
        skip_steps: list[tuple[int, int]] | None = None,
        exhaust: str = "repeat",
        vocab_size: int | None = None,
    ):
        if global_batch % (micro_batch * world):
            raise ValueError(
                f"global batch of {global_batch} sequences does not split into micro-batches of "
                f"{micro_batch} on {world} data-parallel ranks"
            )
        self.sources = [Source(None, data)] if isinstance(data, PackedWindows) else list(data)
        self.mixture = Mixture([s.weight for s in self.sources])
        self.sizes = np.array([len(s.windows) for s in self.sources], dtype=np.int64)
        self.seq_len = self.sources[0].windows.seq_len
        self.seed = seed
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.rank, self.world = rank, world
        self.skip_steps = sorted(skip_steps or [])
        self.exhaust = exhaust
        # Ids at or above this stop the run (None: unchecked); `bad_tokens` lists the last
        # step's, found on this rank (the trainer makes every rank agree before stopping).
        self.vocab_size = vocab_size
        self.bad_tokens: list[str] = []
        self.samples_seen = 0
        self.trained = np.zeros(len(self.sources), dtype=np.int64)  # samples per source
        self.repeated_this_step: list[str] = []  # sources that started over in the last step
        self._perms: dict[int, tuple[int, np.ndarray]] = {}
        if exhaust == "stop" and not self.has_next():
            raise ValueError(
                f"data.exhaust=stop: {self.exhausted_reason()} already in the first global batch"
            )

    def _order(self, source: int, epoch: int) -> np.ndarray:
        cached = self._perms.get(source)
        if cached is None or cached[0] != epoch:
            src = self.sources[source]
            rng = np.random.default_rng([self.seed, epoch, *src.rng_key()])
            cached = self._perms[source] = (epoch, rng.permutation(len(src.windows)))
        return cached[1]

    def sample(self, g: int) -> tuple[int, int]:
        """(source, window index in it) of global sample number g."""
        i = int(self.mixture.source_of(g))
        j = int(self.mixture.counts_before(g)[i])
        n = int(self.sizes[i])
        return i, int(self._order(i, j // n)[j % n])

    def sample_index(self, g: int) -> int:
        """Window index (within its source) of global sample number g."""
        return self.sample(g)[1]

    def _next_start(self) -> int:
        """The first global sample of the next step, past the `skip_steps` ranges."""
        start = self.samples_seen
        for first, last in sorted(self.skip_steps):
            # Global batch b is the one original step b + 1 trained on.
            if first <= start // self.global_batch + 1 <= last:
                start = last * self.global_batch
        return start

    def has_next(self) -> bool:
        """False when `exhaust="stop"` and the next global batch would start a source over."""
        if self.exhaust != "stop":
            return True
        end = self.mixture.counts_before(self._next_start() + self.global_batch)
        return bool((end <= self.sizes).all())

    def exhausted_reason(self) -> str:
        end = self.mixture.counts_before(self._next_start() + self.global_batch)
        over = [i for i in range(len(self.sources)) if end[i] > self.sizes[i]]
        i = over[0] if over else 0
        name = self.sources[i].name or "the training data"
        return f"source {name!r} ({self.sizes[i]} windows of {self.seq_len + 1} tokens) is used up"

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches (inputs, targets) for the next optimizer step."""
        start = self.samples_seen = self._next_start()
        before = self.mixture.counts_before(start)
        after = self.mixture.counts_before(start + self.global_batch)
        self.trained += after - before
        # A source starts over in this batch when its sample number sizes[i] falls in it.
        self.repeated_this_step = [
            self.sources[i].name or "the training data"
            for i in range(len(self.sources))
            if before[i] <= self.sizes[i] < after[i]
        ]
        for name in self.repeated_this_step:
            if self.rank == 0:
                log.warning(
                    "data: %s used all its windows; repeating it in a fresh shuffled order", name
                )
        per_rank = self.global_batch // self.world
        g = np.arange(start + self.rank * per_rank, start + (self.rank + 1) * per_rank)
        src = self.mixture.source_of(g)
        j = self.mixture.counts_before(g)[np.arange(per_rank), src]
        epoch, pos = np.divmod(j, self.sizes[src])
        picks = [
            (self.sources[i].windows, int(self._order(i, e)[p]))
            for i, e, p in zip(src.tolist(), epoch.tolist(), pos.tolist(), strict=True)
        ]
        rows = np.stack([windows.window(w) for windows, w in picks])
        self.bad_tokens = []
        if self.vocab_size is not None and out_of_vocab(rows, self.vocab_size):
            self.bad_tokens = describe_bad_ids(rows, picks, self.vocab_size)
            # Still a valid batch for this step's collectives (every rank must run them); the
            # trainer stops the run before the optimizer step.
            rows[(rows < 0) | (rows >= self.vocab_size)] = 0
        self.samples_seen += self.global_batch
        t = torch.from_numpy(rows)
        return [
            (t[i : i + self.micro_batch, :-1], t[i : i + self.micro_batch, 1:])
            for i in range(0, per_rank, self.micro_batch)
        ]

    def tokens_by_source(self) -> dict[str, int]:
        """Training tokens each named source has supplied so far (skipped batches excluded)."""
        return {
            s.name: int(n) * self.seq_len
            for s, n in zip(self.sources, self.trained, strict=True)
            if s.name is not None
        }

    def _identity(self) -> dict:
        """What a checkpoint's position is relative to: other values would not continue the
        same sample sequence."""
        mine = {"seq_len": self.seq_len, "seed": self.seed}
        if self.sources[0].name is None:
            mine["num_windows"] = int(self.sizes[0])
        else:
            mine["sources"] = [
                {"name": s.name, "weight": s.weight, "num_windows": len(s.windows)}
                for s in self.sources
            ]
        return mine

    def state_dict(self) -> dict:
        state = {"samples_seen": self.samples_seen, **self._identity()}
        if self.sources[0].name is not None:
            state["trained_samples"] = self.trained.tolist()
        return state

    def load_state_dict(self, state: dict) -> None:
        for key, value in self._identity().items():
            if state.get(key) != value:
                raise ValueError(
                    f"checkpointed data loader has {key}={state.get(key)} but this run has "
                    f"{value}: resuming on other data or settings would not continue the same "
                    "sample order"
                )
        self.samples_seen = int(state["samples_seen"])
        if "trained_samples" in state:
            self.trained = np.array(state["trained_samples"], dtype=np.int64)


def validation_batches(
    windows: PackedWindows, micro_batch: int, num_batches: int, rank: int = 0, world: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Data-parallel rank `rank`'s batches of the one fixed validation set.

    The set is the split's first `micro_batch * num_batches` windows in stored order (fewer if
    the split is smaller), whatever the world size, so `val_loss` means the same thing on any
    topology and after a resume on another one. Evaluation cannot be left to rank 0: under
    FSDP every rank takes part in each forward, and the trainer averages every rank's mean.
    So the set is cut into `g = gcd(size, world)` equal contiguous shares, rank r evaluating
    share r % g (when g < world, several ranks evaluate the same share), and every share into
    batches of one size `b` (the largest divisor of the share no larger than `micro_batch`).
    Every batch then weighs the same, and the mean over ranks of each rank's mean batch loss
    is the mean over the whole set: the same batches as on one process, averaged in another
    order."""
    total = min(len(windows), micro_batch * num_batches)
    groups = math.gcd(total, world)
    share = total // groups
    size = max(d for d in range(1, min(micro_batch, share) + 1) if share % d == 0)
    first = (rank % groups) * share
    out = []
    for i in range(first, first + share, size):
        rows = np.stack([windows.window(j) for j in range(i, i + size)])
        t = torch.from_numpy(rows)
        out.append((t[:, :-1], t[:, 1:]))
    return out


@dataclass
class ValidationSet:
    """One source's validation batches on this rank. `name` None: the `data.path` shorthand."""

    name: str | None
    weight: float
    batches: list[tuple[torch.Tensor, torch.Tensor]]


def open_sources(data_cfg) -> list[Source]:
    """`data.sources` (or the `data.path` shorthand, or the embedded corpus) as training
    sources, refusing sets made with different tokenizers."""
    opts = read_options(data_cfg)
    if not data_cfg.sources:
        path = resolve_data_path(data_cfg.path, data_cfg.cache_dir)
        verify_shards(path, data_cfg.verify, opts)
        return [Source(None, PackedWindows(path, "train", data_cfg.seq_len, opts))]
    windows = []
    for s in data_cfg.sources:
        path = Path(s.path).expanduser()
        verify_shards(path, data_cfg.verify, opts)
        windows.append(PackedWindows(path, "train", data_cfg.seq_len, opts))
    names = [s.name for s in data_cfg.sources]
    tokens = [w.reader.num_tokens for w in windows]
    weights = resolve_weights([s.weight for s in data_cfg.sources], tokens, names)
    sources = [Source(*x) for x in zip(names, windows, weights, strict=True)]
    check_same_tokenizer(sources)
    return sources


def read_options(data_cfg) -> ReadOptions:
    """How foreign token data is read (data_pipeline/formats): its declared tokenizer and the
    validation share."""
    return ReadOptions(data_cfg.tokenizer, data_cfg.validation_fraction)


def verify_shards(path: Path, enabled: bool, opts: ReadOptions | None = None) -> None:
    """`data.verify=true`: every shard file's sha256 against the manifest before training, so
    bytes changed on disk since the pipeline wrote them stop the run naming the file (foreign
    data: every id against the declared vocabulary)."""
    if enabled:
        log.info("data.verify: hashing the shards of %s", path)
        verify_data(path, opts)


def _tokenizer_record(manifest: dict) -> dict:
    """The manifest's tokenizer record without where its files were (a copy elsewhere is the
    same tokenizer)."""
    return {k: v for k, v in manifest["tokenizer"].items() if k != "path"}


def _describe_tokenizer(record: dict) -> str:
    files = record.get("files") or {}
    hashes = ", ".join(f"{f} sha256 {h}" for f, h in sorted(files.items())) or "no file hashes"
    return (
        f"{record.get('name')!r} ({hashes}; vocab_size {record.get('vocab_size')}, "
        f"eos_id {record.get('eos_id')})"
    )


def check_same_tokenizer(sources: Sequence[Source]) -> None:
    """Every source's manifest names the same tokenizer (name, file hashes, vocab, separator);
    mixing ids of two tokenizers would train on nonsense without any error."""
    first = sources[0]
    want = _tokenizer_record(first.windows.reader.manifest)
    for s in sources[1:]:
        got = _tokenizer_record(s.windows.reader.manifest)
        if not same_tokenizer(got, want):
            raise ValueError(
                f"data.sources: {s.name!r} ({s.windows.reader.path}) was tokenized with "
                f"{_describe_tokenizer(got)}, but {first.name!r} ({first.windows.reader.path}) "
                f"with {_describe_tokenizer(want)}; all sources must share one tokenizer"
            )


def build_data(
    cfg, rank: int = 0, world: int = 1, val_micro_batch: int | None = None
) -> tuple[GlobalOrderLoader, list[ValidationSet]]:
    """The training loader and this data-parallel rank's validation sets for a job config.

    The validation set's size is `val_micro_batch x train.eval_batches` windows, with
    `val_micro_batch` the micro-batch of ONE rank (`cfg.resolve_micro_batch(1)` by default): a
    micro-batch derived per world size would change the set, and `val_loss` with it."""
    if val_micro_batch is None:
        val_micro_batch = cfg.resolve_micro_batch(1)
    data = cfg.data
    sources = open_sources(data)
    manifest = sources[0].windows.reader.manifest
    vocab = int(manifest["vocab_size"])
    if manifest["vocab_size"] > cfg.model.vocab_size:
        raise ValueError(
            f"{sources[0].windows.reader.path}: token ids go up to {manifest['vocab_size']}, "
            f"more than model.vocab_size={cfg.model.vocab_size}"
        )
    loader = GlobalOrderLoader(
        sources,
        cfg.train.seed,
        cfg.global_batch_samples(),
        cfg.train.micro_batch_size,
        rank,
        world,
        skip_steps=[tuple(r) for r in data.skip_steps],
        exhaust=data.exhaust,
        vocab_size=vocab,
    )
    val_sets: list[ValidationSet] = []
    if cfg.train.eval_interval > 0:
        opts = read_options(data)
        for s in sources:
            path = s.windows.reader.path
            if s.name is not None and split_tokens(path, "validation", opts) <= data.seq_len:
                log.info("data: source %r has no validation split; no val_loss/%s", s.name, s.name)
                continue
            windows = PackedWindows(path, "validation", data.seq_len, opts)
            check_validation_ids(windows, val_micro_batch * cfg.train.eval_batches, vocab)
            batches = validation_batches(
                windows, val_micro_batch, cfg.train.eval_batches, rank, world
            )
            val_sets.append(ValidationSet(s.name, s.weight, batches))
        if not val_sets:
            log.warning("data: no source has a validation split; evaluation is off")
    return loader, val_sets


def check_validation_ids(windows: PackedWindows, num_windows: int, vocab_size: int) -> None:
    """The whole fixed validation set (the split's first windows), checked once at start-up on
    every rank alike, so all ranks stop together before any evaluation."""
    n = min(len(windows), num_windows)
    rows = windows.reader.read(0, n * windows.seq_len + 1)[None]
    if out_of_vocab(rows, vocab_size):
        bad = describe_bad_ids(rows, [(windows, 0)], vocab_size)
        raise BadTokenIds(
            f"{len(bad)} token id(s) of the validation set outside the vocabulary "
            f"[0, {vocab_size}): {'; '.join(bad[:5])}"
        )


def validation_row(val_sets: Sequence[ValidationSet], losses: Sequence[float]) -> dict:
    """The eval row's losses: `val_loss/<name>` per named source and `val_loss`, their mean
    weighted as training draws them (over the sources that have a validation split)."""
    row = {f"val_loss/{v.name}": x for v, x in zip(val_sets, losses, strict=True) if v.name}
    total = sum(v.weight for v in val_sets)
    overall = sum(v.weight * x for v, x in zip(val_sets, losses, strict=True)) / total
    return {"val_loss": overall, **row}
