"""Training data: token shards -> packed windows in a deterministic, resumable global order.

The split's shards form one token stream (documents separated by `</s>`), cut into windows of
`seq_len + 1` tokens that overlap by one (inputs are the first `seq_len`, targets the last).
The order of windows is a permutation per epoch drawn from the seed alone, and a global batch is
a run of consecutive positions in that order; rank r of W takes the r-th slice of each global
batch. So the samples a step sees depend on the seed and the step, never on the world size, and
the loader's whole state is one number: how many samples the run has consumed.

`skip_steps` ranges (`data.skip_steps`) name optimizer steps of the original order whose global
batches are passed over; skipping moves that number forward, so it is as deterministic and as
world-size independent as the order itself.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from data_pipeline.shards import SplitReader, read_manifest


def resolve_data_path(path: str | None, cache_dir: str) -> Path:
    """`data.path`, or the embedded tiny corpus (built once into `cache_dir`) when unset."""
    if path:
        return Path(path).expanduser()
    from data_pipeline.tiny_corpus import build_tiny_shards

    return build_tiny_shards(Path(cache_dir).expanduser() / "tiny-corpus")


class PackedWindows:
    """Fixed-length windows over one split's token stream."""

    def __init__(self, path: str | Path, split: str, seq_len: int):
        self.reader = SplitReader(path, split)
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


class GlobalOrderLoader:
    """Rank `rank`'s micro-batches of each global batch, in the seed's global order."""

    def __init__(
        self,
        windows: PackedWindows,
        seed: int,
        global_batch: int,
        micro_batch: int,
        rank: int = 0,
        world: int = 1,
        skip_steps: list[tuple[int, int]] | None = None,
    ):
        if global_batch % (micro_batch * world):
            raise ValueError(
                f"global batch of {global_batch} sequences does not split into micro-batches of "
                f"{micro_batch} on {world} data-parallel ranks"
            )
        self.windows, self.seed = windows, seed
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.rank, self.world = rank, world
        self.skip_steps = sorted(skip_steps or [])
        self.samples_seen = 0
        self._perm_epoch, self._perm = -1, None

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm, self._perm_epoch = rng.permutation(len(self.windows)), epoch
        return self._perm

    def sample_index(self, g: int) -> int:
        """Window index of global sample number g."""
        n = len(self.windows)
        return int(self._order(g // n)[g % n])

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches (inputs, targets) for the next optimizer step."""
        for first, last in self.skip_steps:
            # Global batch b is the one original step b + 1 trained on.
            if first <= self.samples_seen // self.global_batch + 1 <= last:
                self.samples_seen = last * self.global_batch
        per_rank = self.global_batch // self.world
        start = self.samples_seen + self.rank * per_rank
        rows = np.stack(
            [self.windows.window(self.sample_index(start + i)) for i in range(per_rank)]
        )
        self.samples_seen += self.global_batch
        t = torch.from_numpy(rows)
        return [
            (t[i : i + self.micro_batch, :-1], t[i : i + self.micro_batch, 1:])
            for i in range(0, per_rank, self.micro_batch)
        ]

    def state_dict(self) -> dict:
        return {
            "samples_seen": self.samples_seen,
            "seed": self.seed,
            "num_windows": len(self.windows),
            "seq_len": self.windows.seq_len,
        }

    def load_state_dict(self, state: dict) -> None:
        mine = {
            "seq_len": self.windows.seq_len,
            "seed": self.seed,
            "num_windows": len(self.windows),
        }
        for key, value in mine.items():
            if state[key] != value:
                raise ValueError(
                    f"checkpointed data loader has {key}={state[key]} but this run has {value}: "
                    "resuming on other data or settings would not continue the same sample order"
                )
        self.samples_seen = int(state["samples_seen"])


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


def vocab_size_of(path: str | Path) -> int:
    return int(read_manifest(path)["vocab_size"])
