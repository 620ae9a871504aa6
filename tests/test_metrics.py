"""Metric functions on hand-made masks, with every expected number worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from utils.metrics import (
    AverageMeter,
    ProgressMeter,
    SegmentationMeter,
    Summary,
    batch_intersection_and_union,
    giou_ciou,
    intersection_and_union,
    reduce_meters,
)


def test_intersection_and_union_counts_and_ignore():
    # pred: 1 1 0 0 1 ; target: 1 0 0 255 255
    pred = torch.tensor([1, 1, 0, 0, 1], dtype=torch.int32)
    target = torch.tensor([1, 0, 0, 255, 255], dtype=torch.int32)
    inter, union, tgt = intersection_and_union(pred, target, 2, 255)
    # Ignored pixels (3, 4) vanish. Background: pred {2}, target {1,2}, inter {2}. Foreground: pred {0,1},
    # target {0}, inter {0}.
    assert inter.tolist() == [1.0, 1.0]
    assert union.tolist() == [2.0, 2.0]
    assert tgt.tolist() == [2.0, 1.0]
    assert inter.dtype == torch.float32
    # Pure: the prediction is not modified (the original wrote 255 into it).
    assert pred.tolist() == [1, 1, 0, 0, 1]


def test_intersection_and_union_2d_3d_and_stray_value():
    pred = torch.tensor([[[1, 0], [1, 1]]], dtype=torch.uint8)  # 3-D
    target = torch.tensor([[[1, 2], [0, 1]]], dtype=torch.uint8)  # value 2 falls outside both bins
    inter, union, tgt = intersection_and_union(pred, target)
    # bg: pred {1}, target {2}, inter {} -> union 2 ; fg: pred {0,2,3}, target {0,3}, inter {0,3} -> union 3
    assert inter.tolist() == [0.0, 2.0]
    assert union.tolist() == [2.0, 3.0]
    assert tgt.tolist() == [1.0, 2.0]
    i2, u2, t2 = intersection_and_union(pred[0], target[0])
    assert torch.equal(i2, inter) and torch.equal(u2, union) and torch.equal(t2, tgt)


def test_intersection_and_union_more_classes_matches_bincount():
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 4, (50,), generator=g)
    target = torch.randint(0, 4, (50,), generator=g)
    target[::7] = 255
    inter, union, tgt = intersection_and_union(pred, target, num_classes=4)
    keep = target != 255
    p, t = pred[keep], target[keep]
    exp_i = torch.bincount(p[p == t], minlength=4).float()
    exp_u = torch.bincount(p, minlength=4).float() + torch.bincount(t, minlength=4).float() - exp_i
    assert torch.equal(inter, exp_i) and torch.equal(union, exp_u)
    assert torch.equal(tgt, torch.bincount(t, minlength=4).float())


def test_intersection_and_union_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        intersection_and_union(torch.zeros(3), torch.zeros(4))


def test_batch_version_equals_per_mask_histc():
    g = torch.Generator().manual_seed(1)
    pred = torch.randint(0, 2, (5, 6, 7), generator=g)
    target = torch.randint(0, 2, (5, 6, 7), generator=g)
    target[1, :2] = 255
    target[3] = 0
    pred[3] = 0  # empty vs empty
    inter, union = batch_intersection_and_union(pred, target)
    for k in range(5):
        i, u, _ = intersection_and_union(pred[k], target[k])
        assert inter[k].tolist() == i.tolist() and union[k].tolist() == u.tolist()


def test_segmentation_meter_hand_numbers():
    # Image A: two masks of 4 pixels. Mask 1: pred fg {0,1}, gt fg {1,2} -> I=1, U=3.
    # Mask 2: pred empty, gt empty -> fg I=0, U=0 -> counts as IoU 1.
    # Image B: one mask, pred fg {0,1,2,3}, gt fg {0,1} and pixel 3 ignored -> I=2, U=3.
    logits_a = torch.tensor([[[5.0, 2.0], [-1.0, -3.0]], [[-1.0, -1.0], [-1.0, -1.0]]])
    gt_a = torch.tensor([[[0, 1], [1, 0]], [[0, 0], [0, 0]]], dtype=torch.uint8)
    logits_b = torch.ones(1, 2, 2)
    gt_b = torch.tensor([[[1, 1], [0, 255]]], dtype=torch.uint8)
    meter = SegmentationMeter()
    ious_a = meter.update(logits_a, gt_a)
    meter.update(logits_b, gt_b)
    assert ious_a.tolist() == pytest.approx([1 / (3 + 1e-5), 1.0])
    fg_ious = [1 / (3 + 1e-5), 1.0, 2 / (3 + 1e-5)]
    assert meter.giou == pytest.approx(sum(fg_ious) / (3 + 1e-5), abs=1e-12)
    assert meter.ciou == pytest.approx((1 + 0 + 2) / (3 + 0 + 3 + 1e-10), abs=1e-12)
    assert meter.num_masks == 3
    # all_reduce without a process group keeps the numbers (single-process path of the original).
    before = (meter.giou, meter.ciou)
    meter.all_reduce()
    assert (meter.giou, meter.ciou) == pytest.approx(before)
    assert giou_ciou([logits_a, logits_b], [gt_a, gt_b]) == pytest.approx(before)


def test_segmentation_meter_empty_split_and_all_ignored():
    assert SegmentationMeter().giou == 0.0 and SegmentationMeter().ciou == 0.0
    meter = SegmentationMeter()
    meter.update(torch.ones(1, 2, 2), torch.full((1, 2, 2), 255, dtype=torch.uint8))
    # Everything ignored: union 0 -> IoU 1, cumulative union 0 -> cIoU 0.
    assert meter.giou == pytest.approx(1 / (1 + 1e-5))
    assert meter.ciou == 0.0


def test_average_meter_vector_and_strings():
    m = AverageMeter("loss", ":.4f")
    m.update(2.0, n=3)
    m.update(torch.tensor(4.0), n=1)
    assert m.sum == 10.0 and m.count == 4 and m.avg == 2.5
    assert str(m) == "loss 4.0000 (2.5000)"
    v = AverageMeter("Union", ":6.3f", Summary.SUM)
    v.update(np.array([1.0, 2.0]))
    v.update(np.array([3.0, 4.0]))
    np.testing.assert_allclose(v.sum, [4.0, 6.0])
    assert v.summary() == "Union 6.000"
    p = ProgressMeter(500, [m], prefix="Epoch: [0]")
    assert p.line(7) == "Epoch: [0][  7/500]\tloss 4.0000 (2.5000)"


def _reduce_worker(rank: int, port: int, out_dir: str) -> None:
    """Rank 0 sees one image in the "short" subset, rank 1 none: the reduction must still line up."""
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        meters = {"all": SegmentationMeter(), "short": SegmentationMeter()}
        gt = torch.tensor([[[1, 1], [0, 0]]])
        pred = torch.tensor([[[1.0, -1.0], [-1.0, -1.0]]])  # I = 1, U = 2 for the foreground
        meters["all"].update(pred, gt)
        if rank == 0:
            meters["short"].update(pred, gt)
        result = reduce_meters(meters)
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_meters_reduce_when_a_rank_saw_nothing(tmp_path):
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_reduce_worker, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["all"]["num_masks"] == 2 and result["all"]["ciou"] == pytest.approx(2 / 4)
        assert result["short"]["num_masks"] == 1 and result["short"]["ciou"] == pytest.approx(1 / 2)
        assert result["short"]["giou"] == pytest.approx(0.5 / (1 + 1e-5), rel=1e-4)
