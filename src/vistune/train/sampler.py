"""Which samples go into which batch, on which process, at every step.

The plan is a pure function of (seed, epoch), so a resumed run re-creates it and
starts at the saved step; and the *global* batch of a step is the same for any
number of processes, so 1 process with batch 16 and 2 processes with batch 8 see the
same samples at the same step.

    epoch order  ──►  windows (one optimizer step: batch x processes x grad_accum samples)
                 ──►  micro-chunks (one forward: batch x processes samples)
                 ──►  this process's slice of each micro-chunk

With ``group_by_length`` (LLaVA's ``group_by_modality_length``), samples with and
without images are shuffled apart, ranked by length within pools of a few windows and
cut into windows, and the windows shuffled: each window holds one modality and
samples of similar lengths (less padding), and the processes get similar amounts of work.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BatchPlan:
    num_samples: int
    batch_size: int  # per process
    world_size: int = 1
    grad_accum: int = 1
    seed: int = 0
    shuffle: bool = True
    lengths: list[int] | None = None  # signed: negative = text-only (needed for group_by_length)
    group_by_length: bool = False

    def __post_init__(self) -> None:
        if self.group_by_length and self.lengths is None:
            raise ValueError("group_by_length needs the samples' lengths")
        if self.lengths is not None and len(self.lengths) != self.num_samples:
            raise ValueError(f"{len(self.lengths)} lengths for {self.num_samples} samples")
        if self.num_samples < self.world_size:
            raise ValueError(f"{self.num_samples} samples cannot feed {self.world_size} processes")

    @property
    def micro_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def window_size(self) -> int:
        return self.micro_size * self.grad_accum

    def usable(self) -> int:
        # With several processes every micro-chunk must split evenly; drop the remainder.
        return self.num_samples - self.num_samples % self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.usable() // self.window_size)

    def epoch_order(self, epoch: int) -> list[int]:
        """Every sample index once, in this epoch's order."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        if self.group_by_length:
            order = grouped_order(self.lengths, self.window_size, g)
        elif self.shuffle:
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        return order[: self.usable()]

    def windows(self, epoch: int) -> list[list[list[int]]]:
        """Global plan: windows -> micro-chunks -> sample indices."""
        order = self.epoch_order(epoch)
        out = []
        for w in range(0, len(order), self.window_size):
            win = order[w:w + self.window_size]
            out.append([win[c:c + self.micro_size] for c in range(0, len(win), self.micro_size)])
        return out

    def rank_windows(self, epoch: int, rank: int) -> list[list[list[int]]]:
        """This process's micro-batches, window by window."""
        out = []
        for win in self.windows(epoch):
            mine = []
            for chunk in win:
                b = len(chunk) // self.world_size
                mine.append(chunk[rank * b:(rank + 1) * b])
            out.append(mine)
        return out


# Samples are ranked by length within pools of this many windows (LLaVA ranks within
# one window of batch x processes x accumulation, which gains nothing on one process;
# transformers' LengthGroupedSampler uses 50 batches).
POOL_WINDOWS = 16


def grouped_order(lengths: list[int], window: int, g: torch.Generator) -> list[int]:
    """Modality- and length-grouped order (see module doc).

    Full windows of each modality are shuffled together; the leftovers of both
    modalities form the last window(s), as in LLaVA.
    """
    mm = [i for i, n in enumerate(lengths) if n >= 0]
    text = [i for i, n in enumerate(lengths) if n < 0]
    full: list[list[int]] = []
    rest: list[int] = []
    pool = window * POOL_WINDOWS
    for group in (mm, text):
        if not group:
            continue
        perm = [group[k] for k in torch.randperm(len(group), generator=g).tolist()]
        for p in range(0, len(perm), pool):
            ranked = sorted(perm[p:p + pool], key=lambda i: -abs(lengths[i]))
            for w in range(0, len(ranked), window):
                win = ranked[w:w + window]
                if len(win) == window:
                    full.append(win)
                else:
                    rest.extend(win)
    order_of_windows = torch.randperm(len(full), generator=g).tolist()
    out = [i for k in order_of_windows for i in full[k]]
    out.extend(sorted(rest, key=lambda i: -abs(lengths[i])))
    return out
