"""The training mixture: several sub-datasets drawn with fixed probabilities (``--dataset`` / ``--sample_rates``).

Sampling is a pure function of ``(seed, rank, epoch, index)``: item ``idx`` seeds its own
``numpy.random.Generator`` with ``[seed, rank, epoch, idx]``, which picks the sub-dataset and then everything inside
it (image, queries, templates). Consequences, all intended:

- the same (seed, rank, epoch, idx) always gives the same sample, whatever the number of DataLoader workers or
  the order in which they run (the original used global RNGs, so its stream depended on the worker count);
- different ranks draw different samples even for the same index (the original very probably drew the same
  ones on every GPU, data.md §8 / scripts.md §8.14);
- ``set_epoch(e)`` gives a fresh set of draws per epoch (call it before creating the epoch's iterator; with
  non-persistent workers each iterator receives the updated copy).

Paths of every configured source are checked up front (:func:`validate_dataset_dir`), so a missing source fails
before any model is built, with one message listing every missing path and the expected tree.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
from torch.utils.data import Dataset

from dataset.errors import DatasetError
from dataset.preprocess import ImagePreprocessor
from dataset.reason_seg import ReasonSegDataset, parse_reason_data
from dataset.refer import COCO_IMAGE_DIR, REFCLEF_IMAGE_DIR, REFER_DATASETS, ReferSegDataset, split_by_for
from dataset.sem_seg import DEFAULT_SEM_SEG_DATA, SemSegDataset, parse_sem_seg_data
from dataset.vqa import VQADataset

TRAIN_DATASETS: tuple[str, ...] = ("sem_seg", "refer_seg", "neg_refer_seg", "correct_refer_seg", "vqa", "reason_seg")

# The released mixes (train_read.sh / README of the original), `--dataset` order first.
REASONSEG_MIX = "sem_seg||refer_seg||correct_refer_seg||vqa||neg_refer_seg||reason_seg"
REFERSEG_MIX = "refer_seg||correct_refer_seg||vqa||neg_refer_seg"
RELEASED_MIXES: dict[str, tuple[str, str]] = {
    "reasonseg": (REASONSEG_MIX, "10,1,1,1,1,10"),
    "reasonseg-13b-stage1": (REASONSEG_MIX, "10,10,2,3,1,1"),
    "reasonseg-13b-finetune": (REASONSEG_MIX, "3,10,2,3,1,10"),
    "referseg": (REFERSEG_MIX, "12,2,2,1"),
}

DATASET_TREE = """\
<dataset_dir>/
├── reason_seg/ReasonSeg/{train,val,test}/<stem>.jpg + <stem>.json
├── refer_seg/
│   ├── images/mscoco/images/train2014/COCO_train2014_<12 digits>.jpg
│   ├── images/saiapr_tc-12/<file_name from refclef/instances.json>
│   ├── refclef/{refs(unc).p, instances.json}
│   ├── refcoco/ refcoco+/ R-refcoco/ R-refcoco+/{refs(unc_exclude_unified).p, instances.json}
│   ├── refcocog/ R-refcocog/{refs(umd_exclude_unified).p, instances.json}
│   └── fprefcoco/ fprefcoco+/ fprefcocog/{refs(berkeley_exclude_unified).p, instances.json}
├── coco/train2017/<12 digits>.jpg
├── cocostuff/train2017/<12 digits>.png
├── ade20k/images/training/*.jpg + ade20k/annotations/training/*.png
├── mapillary/config_v2.0.json + training/v2.0/labels/*.png + training/images/*.jpg
├── vlpart/paco/annotations/paco_lvis_v1_train.json
├── vlpart/pascal_part/train.json + VOCdevkit/VOC2010/JPEGImages/*.jpg
└── llava_dataset/llava_instruct_150k.json"""


@dataclass
class HybridConfig:
    """The data flags of the training entry point (same names and meaning as the original's CLI)."""

    dataset: str = REFERSEG_MIX
    # The original default "9,3,3" had 3 weights for 4 datasets and crashed; this is its released ReferSeg mix.
    sample_rates: str = "12,2,2,1"
    sem_seg_data: str = DEFAULT_SEM_SEG_DATA
    refer_seg_data: str = "refclef||refcoco||refcoco+||refcocog"
    neg_refer_seg_data: str = "R-refcocog||R-refcoco||R-refcoco+"
    correct_refer_seg_data: str = "fprefcoco||fprefcoco+||fprefcocog"  # the original parsed but never passed it
    vqa_data: str = "llava_instruct_150k"
    reason_seg_data: str = "ReasonSeg|train"
    num_classes_per_sample: int = 1
    image_size: int = 1024
    template: str = "llava_v1"

    @classmethod
    def from_namespace(cls, args: Any) -> "HybridConfig":
        """Take the fields an argparse namespace has (``--conv_type`` fills ``template``); others keep defaults."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        if hasattr(args, "conv_type"):
            values["template"] = args.conv_type
        return cls(**values)


def parse_dataset_names(dataset: str) -> list[str]:
    """``--dataset`` split on ``||``; unknown or repeated names raise one ValueError naming the flag."""
    names = [n for n in dataset.split("||") if n]
    if not names:
        raise ValueError(f"--dataset names no sub-dataset: {dataset!r}; expected names from {', '.join(TRAIN_DATASETS)}")
    unknown = [n for n in names if n not in TRAIN_DATASETS]
    if unknown:
        raise ValueError(
            f"--dataset: unknown sub-dataset(s) {', '.join(map(repr, unknown))}; expected names from "
            f"{', '.join(TRAIN_DATASETS)} joined by '||'"
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"--dataset: {', '.join(repeated)} listed more than once; give each sub-dataset once "
                         "and set its weight in --sample_rates")
    return names


def parse_sample_rates(dataset: str, sample_rates: Union[str, Sequence[float]]) -> list[float]:
    """Probabilities aligned with ``--dataset`` (weights normalised to sum 1); a count mismatch is one ValueError."""
    names = parse_dataset_names(dataset)
    if isinstance(sample_rates, str):
        try:
            weights = [float(x) for x in sample_rates.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--sample_rates must be comma-separated numbers, got {sample_rates!r}") from None
    else:
        weights = [float(x) for x in sample_rates]
    if len(weights) != len(names):
        raise ValueError(
            f"--sample_rates has {len(weights)} weight(s) ({sample_rates!r}) but --dataset names {len(names)} "
            f"sub-dataset(s) ({'||'.join(names)}); give exactly one weight per sub-dataset, in the same order"
        )
    if any(not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--sample_rates must be non-negative numbers with a positive sum, got {sample_rates!r}")
    total = sum(weights)
    return [w / total for w in weights]


def _names(value: str, flag: str) -> list[str]:
    names = [n for n in value.split("||") if n]
    if not names:
        raise ValueError(f"{flag} names no dataset: {value!r}")
    return names


def _refer_paths(value: str, flag: str) -> list[tuple[str, str]]:
    out = []
    for name in _names(value, flag):
        if name not in REFER_DATASETS:
            raise ValueError(f"{flag}: unknown refer dataset {name!r}; expected names from {', '.join(REFER_DATASETS)}")
        out += [
            (f"refer_seg/{name}/refs({split_by_for(name)}).p", "file"),
            (f"refer_seg/{name}/instances.json", "file"),
            (f"refer_seg/{REFCLEF_IMAGE_DIR if name == 'refclef' else COCO_IMAGE_DIR}", "dir"),
        ]
    return out


SEM_SEG_PATHS: dict[str, list[tuple[str, str]]] = {
    "ade20k": [("ade20k/images/training", "dir"), ("ade20k/annotations/training", "dir")],
    "cocostuff": [("cocostuff/train2017", "dir"), ("coco/train2017", "dir")],
    "mapillary": [("mapillary/config_v2.0.json", "file"), ("mapillary/training/v2.0/labels", "dir"),
                  ("mapillary/training/images", "dir")],
    "paco_lvis": [("vlpart/paco/annotations/paco_lvis_v1_train.json", "file"), ("coco/train2017", "dir")],
    "pascal_part": [("vlpart/pascal_part/train.json", "file"),
                    ("vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages", "dir")],
}


def required_paths(config: HybridConfig) -> dict[str, list[tuple[str, str]]]:
    """Per ``--dataset`` entry, the (relative path, "file"|"dir") pairs its loaders open first."""
    out: dict[str, list[tuple[str, str]]] = {}
    for name in parse_dataset_names(config.dataset):
        if name == "sem_seg":
            out[name] = [p for s in parse_sem_seg_data(config.sem_seg_data) for p in SEM_SEG_PATHS[s]]
        elif name == "refer_seg":
            out[name] = _refer_paths(config.refer_seg_data, "--refer_seg_data")
        elif name == "neg_refer_seg":
            out[name] = _refer_paths(config.neg_refer_seg_data, "--neg_refer_seg_data")
        elif name == "correct_refer_seg":
            out[name] = _refer_paths(config.correct_refer_seg_data, "--correct_refer_seg_data")
        elif name == "vqa":
            out[name] = [(f"llava_dataset/{config.vqa_data}.json", "file"), ("coco/train2017", "dir")]
        elif name == "reason_seg":
            try:
                rs_name, splits = parse_reason_data(config.reason_seg_data)
            except ValueError as err:
                raise ValueError(f"--reason_seg_data: {err}") from None
            out[name] = [(f"reason_seg/{rs_name}/{s}", "dir") for s in splits]
    return out


def validate_dataset_dir(dataset_dir: Union[str, Path], config: HybridConfig) -> None:
    """Raise one DatasetError listing every missing path of the configured sources (cheap; call before the model)."""
    root = Path(dataset_dir)
    missing: dict[tuple[str, Path], list[str]] = {}  # (kind, path) -> sources needing it, in --dataset order
    for source, paths in required_paths(config).items():
        for rel, kind in paths:
            p = root / rel
            if not (p.is_dir() if kind == "dir" else p.is_file()):
                users = missing.setdefault((kind, p), [])
                if source not in users:
                    users.append(source)
    if missing:
        lines = [f"  {kind} {p}  [{', '.join(users)}]" for (kind, p), users in missing.items()]
        raise DatasetError(
            f"--dataset_dir {root}: {len(lines)} path(s) needed by --dataset {config.dataset!r} are missing:\n"
            + "\n".join(lines)
            + f"\nexpected tree:\n{DATASET_TREE}"
        )


def build_source(name: str, dataset_dir: Path, preprocessor: ImagePreprocessor, config: HybridConfig) -> Dataset:
    """One sub-dataset of the mixture, configured from ``config`` (every ``*_data`` flag is honoured)."""
    common = dict(template=config.template)
    n = config.num_classes_per_sample
    if name == "sem_seg":
        return SemSegDataset(dataset_dir, preprocessor, config.sem_seg_data, n, **common)
    if name in ("refer_seg", "neg_refer_seg", "correct_refer_seg"):
        data = getattr(config, f"{name}_data")
        return ReferSegDataset(dataset_dir, preprocessor, data, n, **common)
    if name == "vqa":
        return VQADataset(dataset_dir, preprocessor, config.vqa_data, **common)
    if name == "reason_seg":
        return ReasonSegDataset(dataset_dir, preprocessor, config.reason_seg_data, n, **common)
    raise ValueError(f"--dataset: unknown sub-dataset {name!r}; expected names from {', '.join(TRAIN_DATASETS)}")


def samples_per_epoch(batch_size: int, grad_accumulation_steps: int, steps_per_epoch: int, world_size: int) -> int:
    """Images per epoch over all ranks; ``world_size`` is the process-group size (not the local GPU count)."""
    return batch_size * grad_accumulation_steps * steps_per_epoch * world_size


def _default_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class HybridDataset(Dataset):
    """Mixture of training sources; ``len == samples_per_epoch`` and item ``idx`` is a seeded random draw."""

    def __init__(
        self,
        dataset_dir: Union[str, Path],
        preprocessor: Optional[ImagePreprocessor] = None,
        config: Optional[HybridConfig] = None,
        samples_per_epoch: int = 10000,
        seed: int = 42,
        rank: Optional[int] = None,
    ) -> None:
        self.config = config or HybridConfig()
        self.names = parse_dataset_names(self.config.dataset)
        self.probs = np.asarray(parse_sample_rates(self.config.dataset, self.config.sample_rates), dtype=np.float64)
        if samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1, got {samples_per_epoch}")
        self.dataset_dir = Path(dataset_dir)
        validate_dataset_dir(self.dataset_dir, self.config)
        self.preprocessor = preprocessor or ImagePreprocessor(sam_size=self.config.image_size)
        self.sources = [build_source(n, self.dataset_dir, self.preprocessor, self.config) for n in self.names]
        self.samples_per_epoch = samples_per_epoch
        self.seed = seed
        self.rank = _default_rank() if rank is None else rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw a new set of samples for ``epoch`` (call before building that epoch's DataLoader iterator)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def rng_for(self, idx: int) -> np.random.Generator:
        """The generator of item ``idx`` on this rank and epoch."""
        return np.random.default_rng([self.seed, self.rank, self.epoch, int(idx)])

    def _choose(self, rng: np.random.Generator) -> int:
        return int(rng.choice(len(self.names), p=self.probs))

    def source_index(self, idx: int) -> int:
        """Which sub-dataset item ``idx`` comes from (the first draw of its generator; cheap)."""
        return self._choose(self.rng_for(idx))

    def __getitem__(self, idx: int) -> tuple:
        rng = self.rng_for(idx)
        return self.sources[self._choose(rng)].sample(rng)
