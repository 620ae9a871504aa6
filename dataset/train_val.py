"""Validation on held-back draws from the training mixture (the original's `TrainValDataset`, which could not run).

The original class indexed a dict with ``0`` in ``__len__`` and returned 9-tuples where the validation collate
expects 10. Here every item is a deterministic function of ``(seed, index, attempt)`` only, so all ranks and every
epoch see the same validation samples, and it yields the 10-tuples of ``collate_val``. Draws without a mask (VQA
answers, denials) are redrawn, because teacher-forced validation scores masks.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch.utils.data import Dataset

from .errors import DatasetError
from .hybrid import HybridDataset


class TrainValDataset(Dataset):
    """``num_samples`` fixed samples of ``mixture``'s sources, each with at least one mask, as 10-tuples."""

    def __init__(self, mixture: HybridDataset, num_samples: int = 200, seed: int = 0, max_draws: int = 100) -> None:
        if num_samples < 1:
            raise ValueError(f"TrainValDataset: num_samples must be >= 1, got {num_samples}")
        self.mixture = mixture
        self.num_samples = num_samples
        self.seed = seed
        self.max_draws = max_draws

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> tuple[Any, ...]:
        for attempt in range(self.max_draws):
            rng = np.random.default_rng([self.seed, int(idx), attempt])
            source = self.mixture._choose(rng)
            item = self.mixture.sources[source].sample(rng)
            masks = item[4]
            if masks.shape[0] > 0:
                image_path, conversations = item[0], item[3]
                n = int(masks.shape[0])
                return (*item, list(range(n)), list(range(n)), {image_path: list(conversations)})
        names = ", ".join(self.mixture.names)
        raise DatasetError(
            f"train_val: {self.max_draws} draws from the training mixture ({names}) gave no sample with a mask; "
            "validate on ReasonSeg or a refer dataset instead"
        )
