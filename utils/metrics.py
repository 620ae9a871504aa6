"""Segmentation metrics of READ validation: per-mask intersection/union, gIoU and cIoU, reduced across ranks.

The numbers follow the original ``intersectionAndUnionGPU`` / ``AverageMeter`` / ``validate`` exactly
(histogram semantics, ignore value 255, the 1e-5 / 1e-10 guards, "empty vs empty counts 1"), but the
functions are pure (the prediction is never modified) and run on any device and integer dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist

IGNORE_INDEX = 255
GIOU_EPS = 1e-5  # added to the union of each mask, and to the meter count in all_reduce (as the original)
CIOU_EPS = 1e-10  # added to the cumulative union


def intersection_and_union(
    output: torch.Tensor, target: torch.Tensor, num_classes: int = 2, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class (intersection, union, target) areas of one prediction/target pair, as float tensors [K].

    Both tensors are flattened. Pixels whose target equals ``ignore_index`` are ignored (the prediction is
    set to the ignore value on a copy). Areas are ``torch.histc(bins=K, min=0, max=K-1)`` histograms, so
    values outside [0, K-1] (255, and a stray 2 for K=2) fall outside every bin, as in the original.
    """
    if output.shape != target.shape:
        raise ValueError(f"intersection_and_union: prediction shape {tuple(output.shape)} != target shape {tuple(target.shape)}")
    if output.dim() not in (1, 2, 3):
        raise ValueError(f"intersection_and_union: expected 1-, 2- or 3-D tensors, got {output.dim()}-D")
    out = output.reshape(-1).float()
    tgt = target.reshape(-1).float()
    out = torch.where(tgt == ignore_index, torch.full_like(out, float(ignore_index)), out)
    inter = out[out == tgt]
    kmax = float(num_classes - 1)
    area_inter = torch.histc(inter, bins=num_classes, min=0, max=kmax)
    area_out = torch.histc(out, bins=num_classes, min=0, max=kmax)
    area_tgt = torch.histc(tgt, bins=num_classes, min=0, max=kmax)
    area_union = area_out + area_tgt - area_inter
    return area_inter, area_union, area_tgt


def batch_intersection_and_union(
    pred: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Background/foreground intersection and union of N binary masks at once: two float tensors [N, 2].

    Equal to calling :func:`intersection_and_union` (K=2) on every mask; vectorised over the masks so a
    refer image with dozens of sentences costs one pass. Values other than 0/1 count in no class.
    """
    if pred.shape != target.shape or pred.dim() != 3:
        raise ValueError(f"expected two [N,H,W] tensors of equal shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    n = pred.shape[0]
    p = pred.reshape(n, -1).long()
    t = target.reshape(n, -1).long()
    p = torch.where(t == ignore_index, torch.full_like(p, ignore_index), p)
    inter, union = [], []
    for cls in (0, 1):
        pc, tc = p == cls, t == cls
        i = (pc & tc).sum(1)
        inter.append(i)
        union.append(pc.sum(1) + tc.sum(1) - i)
    return torch.stack(inter, 1).double(), torch.stack(union, 1).double()


class Summary(IntEnum):
    NONE = 0
    AVERAGE = 1
    SUM = 2
    COUNT = 3


Number = Union[float, np.ndarray]


class AverageMeter:
    """Running sum/count/avg of a scalar or a vector, with an all-reduce over the process group."""

    def __init__(
        self, name: str, fmt: str = ":f", summary_type: Summary = Summary.AVERAGE, size: Optional[int] = None
    ) -> None:
        self.name = name
        self.fmt = fmt
        self.summary_type = summary_type
        self.size = size  # a vector meter starts as zeros, so every rank all-reduces the same length
        self.reset()

    def reset(self) -> None:
        zero: Number = np.zeros(self.size) if self.size else 0.0
        self.val = zero
        self.avg = zero
        self.sum = zero
        self.count: float = 0.0

    def update(self, val: Union[Number, torch.Tensor], n: float = 1) -> None:
        if isinstance(val, torch.Tensor):
            val = val.detach().double().cpu().numpy() if val.numel() > 1 else float(val)
        self.val = val
        self.sum = self.sum + val * n
        self.count += n
        self.avg = self.sum / self.count

    def all_reduce(self, group: Optional[dist.ProcessGroup] = None) -> None:
        """Sum ``sum`` and ``count`` over ranks; a no-op without an initialised multi-rank group.

        After the reduction ``avg = sum / (count + 1e-5)``, exactly as the original meter (also on one rank,
        so a single-process and a multi-process run report the same numbers).
        """
        vector = isinstance(self.sum, np.ndarray)
        packed = np.concatenate([np.asarray(self.sum, dtype=np.float64).reshape(-1), [self.count]])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            tensor = torch.tensor(packed, dtype=torch.float64, device=_reduce_device(group))
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
            packed = tensor.cpu().numpy()
        self.sum = packed[:-1].copy() if vector else float(packed[0])
        self.count = float(packed[-1])
        self.avg = self.sum / (self.count + GIOU_EPS)

    def __str__(self) -> str:
        return ("{name} {val" + self.fmt + "} ({avg" + self.fmt + "})").format(**_fmt_fields(self))

    def summary(self) -> str:
        if self.summary_type is Summary.NONE:
            return ""
        key = {Summary.AVERAGE: "avg", Summary.SUM: "sum", Summary.COUNT: "count"}[self.summary_type]
        return ("{name} {" + key + ":.3f}").format(**_fmt_fields(self))


def _fmt_fields(meter: AverageMeter) -> dict:
    def scalar(x: Number) -> float:
        return float(np.asarray(x).reshape(-1)[-1])  # vectors show their foreground (last) entry

    return {"name": meter.name, "val": scalar(meter.val), "avg": scalar(meter.avg), "sum": scalar(meter.sum), "count": meter.count}


def _reduce_device(group: Optional[dist.ProcessGroup]) -> torch.device:
    """gloo reduces CPU tensors; nccl needs the rank's current CUDA device."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class ProgressMeter:
    """``prefix [ b/N]`` followed by the meters, tab-separated (the original's progress line)."""

    def __init__(self, num_batches: int, meters: Sequence[AverageMeter], prefix: str = "") -> None:
        digits = len(str(num_batches))
        self.batch_fmt = "[{:" + str(digits) + "d}/" + str(num_batches) + "]"
        self.meters = list(meters)
        self.prefix = prefix

    def line(self, batch: int) -> str:
        return "\t".join([self.prefix + self.batch_fmt.format(batch)] + [str(m) for m in self.meters])

    def summary_line(self) -> str:
        return " ".join([" *"] + [m.summary() for m in self.meters])


@dataclass
class SegmentationMeter:
    """gIoU / cIoU over a split: Intersec and Union per image (n=1), per-mask IoU sums in gIoU (n=#masks)."""

    intersection: AverageMeter = field(default_factory=lambda: AverageMeter("Intersec", ":6.3f", Summary.SUM, size=2))
    union: AverageMeter = field(default_factory=lambda: AverageMeter("Union", ":6.3f", Summary.SUM, size=2))
    giou_meter: AverageMeter = field(default_factory=lambda: AverageMeter("gIoU", ":6.3f", Summary.SUM, size=2))

    def update(self, pred_logits: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """Add one image's N masks (logits > 0 are foreground; GT may hold 255); returns the N foreground IoUs."""
        pred = (pred_logits > 0).int()
        inter, union = batch_intersection_and_union(pred, gt.int())
        iou = inter / (union + GIOU_EPS) + (union == 0).double()  # empty vs empty counts as IoU 1
        n = pred.shape[0]
        self.intersection.update(inter.sum(0).numpy(force=True), n=1)
        self.union.update(union.sum(0).numpy(force=True), n=1)
        self.giou_meter.update((iou.sum(0) / n).numpy(force=True), n=n)
        return iou[:, 1].float()

    def all_reduce(self, group: Optional[dist.ProcessGroup] = None) -> None:
        for meter in (self.intersection, self.union, self.giou_meter):
            meter.all_reduce(group)

    @property
    def num_masks(self) -> int:
        return int(round(self.giou_meter.count))

    @property
    def ciou(self) -> float:
        """Cumulative foreground intersection over cumulative foreground union."""
        if not isinstance(self.union.sum, np.ndarray):
            return 0.0
        return float(self.intersection.sum[1] / (self.union.sum[1] + CIOU_EPS))

    @property
    def giou(self) -> float:
        """Mean per-mask foreground IoU (``avg[1]`` of the gIoU meter after all_reduce)."""
        if not isinstance(self.giou_meter.sum, np.ndarray):
            return 0.0
        return float(self.giou_meter.sum[1] / (self.giou_meter.count + GIOU_EPS))


def giou_ciou(preds: Iterable[torch.Tensor], gts: Iterable[torch.Tensor]) -> tuple[float, float]:
    """gIoU and cIoU of a list of per-image ``[N,H,W]`` logits against their GT masks (single process)."""
    meter = SegmentationMeter()
    for p, g in zip(preds, gts):
        meter.update(p, g)
    return meter.giou, meter.ciou


def reduce_meters(meters: Mapping[str, SegmentationMeter], group: Optional[dist.ProcessGroup] = None) -> dict[str, dict]:
    """All-reduce every meter (same order on every rank) and return ``{name: {giou, ciou, num_masks}}``."""
    out = {}
    for name in sorted(meters):
        meters[name].all_reduce(group)
        out[name] = {"giou": meters[name].giou, "ciou": meters[name].ciou, "num_masks": meters[name].num_masks}
    return out
