"""Which examples form each batch, on which rank, in which order: a pure function of (seed, epoch).

Keys travel with every example, (stream, epoch, index), and seed its masking (masking.Collator): the same
example is masked the same way in any worker, on any number of ranks, and after a resume.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset, Sampler

from ..data import token_budget_batches
from ..masking import FILLER_STREAM, TRAIN_STREAM


class EpochOrder(Sampler[int]):
    """The index order of one epoch: a permutation seeded by (seed, epoch), or longest-first if not shuffled.

    Lightning calls `set_epoch` on `batch_sampler.sampler` at each epoch start, as for DistributedSampler.
    """

    def __init__(self, lengths: np.ndarray, shuffle: bool, seed: int = 0, epoch: int = 0):
        self.lengths, self.shuffle, self.seed, self.epoch = lengths, shuffle, seed, epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rng(self, epoch: int | None = None) -> np.random.Generator:
        return np.random.default_rng((self.seed, self.epoch if epoch is None else epoch))

    def order(self, epoch: int | None = None) -> np.ndarray:
        """The indices of `epoch` (default: the current one) in order."""
        if self.shuffle:
            return self.rng(epoch).permutation(len(self.lengths))
        return np.argsort(-self.lengths, kind="stable")

    def __iter__(self):
        return iter(self.order())

    def __len__(self) -> int:
        return len(self.lengths)


class ShardedBatchSampler:
    """This rank's batches of one epoch: fixed-size or token-budget (length-bucketed), sharded over ranks.

    All ranks build the same global list of batches, then rank r takes batches r, r + W, r + 2W, ...
    Training (even=True) gives every rank the same number of batches in every epoch, the number of epoch 0
    (token-budget packing makes it vary by a few from epoch to epoch): an epoch with more drops its last
    batches, one with fewer starts over from its first. Lightning measures an epoch once, so this keeps every
    epoch, and a run resumed in any epoch, in step with an uninterrupted one.
    Evaluation (even=False) keeps them, so every sequence is evaluated exactly once (DistributedSampler would
    pad by repeating sequences instead); a rank left without a batch gets one filler batch that counts zero
    (Lightning skips the loop of a rank with no batches, and the others would wait for it at the metric sync).
    Yields, per batch, one ((stream, epoch, index), position) per example: `position` = (epoch, batch number in
    this rank's epoch), from which a resumed run knows where to start (ProteinDataModule.state_dict).
    """

    def __init__(
        self,
        sampler: EpochOrder,
        *,
        batch_size: int | None = None,
        max_tokens: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        even: bool = True,
        stream: int = TRAIN_STREAM,
        bucket: int = 1024,
    ):
        if (batch_size is None) == (max_tokens is None):
            raise ValueError("give exactly one of batch_size and max_tokens")
        self.sampler, self.batch_size, self.max_tokens = sampler, batch_size, max_tokens
        self.rank, self.world_size, self.even, self.stream, self.bucket = rank, world_size, even, stream, bucket
        self.resume: tuple[int, int] | None = None  # (epoch, batches already done in it)
        self._cache: tuple[int, list[np.ndarray], bool] | None = None  # (epoch, batches, filler)
        self._length: int | None = None  # training batches per rank and epoch

    def _global_batches(self, epoch: int) -> list[np.ndarray]:
        order = self.sampler.order(epoch)
        if self.batch_size is not None:
            return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        # Token budget: sort each bucket of the (shuffled) order by length so that a batch holds sequences
        # of similar length (little padding), pack greedily, then shuffle the batches themselves.
        lengths = self.sampler.lengths
        batches: list[np.ndarray] = []
        for start in range(0, len(order), self.bucket):
            chunk = order[start : start + self.bucket]
            batches += [chunk[b] for b in token_budget_batches(lengths[chunk], self.max_tokens)]
        if self.sampler.shuffle:
            batches = [batches[i] for i in self.sampler.rng(epoch).permutation(len(batches))]
        return batches

    def _per_rank(self) -> int:
        """Training batches of every rank in every epoch: those of epoch 0."""
        if self._length is None:
            batches = len(self._global_batches(0))
            if batches < self.world_size:
                raise ValueError(f"{batches} training batches cannot be shared by {self.world_size} ranks: "
                                 "use smaller batches or fewer ranks")
            self._length = batches // self.world_size
        return self._length

    def batches(self) -> list[np.ndarray]:
        """This rank's batches for the sampler's current epoch (cached per epoch)."""
        epoch = self.sampler.epoch
        if self._cache is None or self._cache[0] != epoch:
            batches = self._global_batches(epoch)
            mine = batches[self.rank :: self.world_size]
            if self.even:
                n = self._per_rank()
                mine = (mine * -(-n // len(mine)))[:n]
            self._cache = (epoch, mine or [batches[0][:1]], not mine)
        return self._cache[1]

    def __iter__(self):
        epoch = self.sampler.epoch if self.stream == TRAIN_STREAM else 0
        batches = self.batches()
        stream = FILLER_STREAM if self._cache[2] else self.stream
        start = 0
        if self.resume is not None and self.resume[0] == self.sampler.epoch:
            start = self.resume[1]
        self.resume = None
        for n, batch in enumerate(batches[start:], start=start):
            yield [((stream, epoch, int(i)), (self.sampler.epoch, n)) for i in batch]

    def __len__(self) -> int:
        return len(self.batches())


class Keyed(Dataset):
    """dataset[(key, position)] -> (key, position, dataset[index]): the key seeds the collator's masking."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __getitem__(self, item):
        key, position = item
        if hasattr(self.dataset, "set_epoch"):  # random crops follow the key's epoch, in whichever worker
            self.dataset.set_epoch(key[1])
        return key, position, self.dataset[key[-1]]
