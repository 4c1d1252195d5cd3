"""An endless, reproducible order over problems (or demonstrations) for the online trainer.

    python -c "from posttrain.train.online.problem_stream import ShuffledStream as S; print(S(list('abcde'), 3).take(7))"

One shuffle per pass over the items, seeded by (seed, pass): a resumed run that knows how many
items were drawn continues with exactly the items the uninterrupted run would have drawn.
"""

from __future__ import annotations

import random


class ShuffledStream:
    """`take(n)` hands out the next n items; `drawn` (saved in checkpoints) counts them."""

    def __init__(self, items: list, seed: int, drawn: int = 0):
        if not items:
            raise ValueError("ShuffledStream: no items")
        self.items, self.seed, self.drawn = items, seed, drawn
        self._epoch, self._order = -1, []  # the current pass's order, computed once per pass

    def order(self, epoch: int) -> list[int]:
        """Item indices of pass `epoch` (a permutation of range(len(items)))."""
        if epoch != self._epoch:
            order = list(range(len(self.items)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._epoch, self._order = epoch, order
        return self._order

    def take(self, n: int) -> list:
        out = []
        for i in range(self.drawn, self.drawn + n):
            epoch, pos = divmod(i, len(self.items))
            out.append(self.items[self.order(epoch)[pos]])
        self.drawn += n
        return out
