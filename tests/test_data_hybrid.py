"""Training mixture: flag parsing, up-front path validation, sampling ratios, per-rank/epoch seeding."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset.errors import DatasetError
from dataset.hybrid import (
    DATASET_TREE,
    REASONSEG_MIX,
    RELEASED_MIXES,
    HybridConfig,
    HybridDataset,
    parse_dataset_names,
    parse_sample_rates,
    required_paths,
    samples_per_epoch,
    validate_dataset_dir,
)
from dataset.refer import ReferSegDataset
from dataset.sem_seg import SemSegDataset
from dataset.vqa import VQADataset


@pytest.fixture(scope="module")
def full_mix(synthetic_root: Path) -> HybridDataset:
    config = HybridConfig(dataset=REASONSEG_MIX, sample_rates="10,1,1,1,1,10", num_classes_per_sample=3)
    return HybridDataset(synthetic_root, config=config, samples_per_epoch=64, seed=42, rank=0)


# ------------------------------------------------------------------------------------------ flags


def test_default_config_is_consistent() -> None:
    config = HybridConfig()
    probs = parse_sample_rates(config.dataset, config.sample_rates)
    assert parse_dataset_names(config.dataset) == ["refer_seg", "correct_refer_seg", "vqa", "neg_refer_seg"]
    assert probs == pytest.approx([12 / 17, 2 / 17, 2 / 17, 1 / 17])


def test_released_mixes_parse() -> None:
    expected = {"reasonseg": 24, "reasonseg-13b-stage1": 27, "reasonseg-13b-finetune": 29, "referseg": 17}
    for name, (dataset, rates) in RELEASED_MIXES.items():
        probs = parse_sample_rates(dataset, rates)
        weights = [float(x) for x in rates.split(",")]
        assert probs == pytest.approx([w / expected[name] for w in weights])


def test_original_default_rates_fail_with_one_clear_message() -> None:
    with pytest.raises(ValueError, match=r"--sample_rates has 3 weight\(s\) \('9,3,3'\) but --dataset names 4 sub-dataset"):
        parse_sample_rates("refer_seg||correct_refer_seg||vqa||neg_refer_seg", "9,3,3")


@pytest.mark.parametrize(
    "dataset, rates, message",
    [
        ("refer_seg||partimagenet", "1,1", r"--dataset: unknown sub-dataset\(s\) 'partimagenet'"),
        ("vqa||vqa", "1,1", r"--dataset: vqa listed more than once"),
        ("", "1", r"--dataset names no sub-dataset"),
        ("vqa||refer_seg", "1,x", r"--sample_rates must be comma-separated numbers"),
        ("vqa||refer_seg", "0,0", r"--sample_rates must be non-negative numbers with a positive sum"),
        ("vqa||refer_seg", "-1,2", r"--sample_rates must be non-negative"),
    ],
)
def test_bad_flags(dataset: str, rates: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_sample_rates(dataset, rates)


def test_sub_dataset_flags_are_checked() -> None:
    with pytest.raises(ValueError, match=r"--correct_refer_seg_data: unknown refer dataset 'fpcoco'"):
        required_paths(HybridConfig(dataset="correct_refer_seg", sample_rates="1", correct_refer_seg_data="fpcoco"))
    with pytest.raises(ValueError, match=r"--sem_seg_data: unknown .*'partimagenet'"):
        required_paths(HybridConfig(dataset="sem_seg", sample_rates="1", sem_seg_data="partimagenet"))
    with pytest.raises(ValueError, match=r"--reason_seg_data"):
        required_paths(HybridConfig(dataset="reason_seg", sample_rates="1", reason_seg_data="ReasonSeg"))


def test_config_from_cli_namespace() -> None:
    args = argparse.Namespace(dataset="vqa", sample_rates="1", vqa_data="mine", conv_type="llava_llama_2",
                              num_classes_per_sample=3, lr=1e-4)
    config = HybridConfig.from_namespace(args)
    assert (config.dataset, config.sample_rates, config.vqa_data, config.template, config.num_classes_per_sample) == (
        "vqa", "1", "mine", "llava_llama_2", 3)
    assert config.sem_seg_data == HybridConfig().sem_seg_data


def test_samples_per_epoch() -> None:
    assert samples_per_epoch(2, 10, 500, 1) == 10000 and samples_per_epoch(2, 10, 500, 8) == 80000


# ------------------------------------------------------------------------------------------ paths


def test_missing_sources_fail_up_front_with_the_tree(tmp_path: Path) -> None:
    config = HybridConfig(dataset=REASONSEG_MIX, sample_rates="1,1,1,1,1,1")
    with pytest.raises(DatasetError) as err:
        HybridDataset(tmp_path, config=config, samples_per_epoch=8)
    msg = str(err.value)
    for needle in ("ade20k/images/training  [sem_seg]", "vlpart/pascal_part/train.json",
                   "refer_seg/refclef/refs(unc).p", "refer_seg/R-refcocog/refs(umd_exclude_unified).p",
                   "refer_seg/fprefcoco+/refs(berkeley_exclude_unified).p", "llava_dataset/llava_instruct_150k.json",
                   "reason_seg/ReasonSeg/train", "--dataset_dir", DATASET_TREE):
        assert needle in msg
    assert msg.count("coco/train2017  [") == 1  # listed once although two sources need it
    assert "coco/train2017  [sem_seg, vqa]" in msg


def test_synthetic_root_passes_validation(synthetic_root: Path) -> None:
    validate_dataset_dir(synthetic_root, HybridConfig(dataset=REASONSEG_MIX, sample_rates="1,1,1,1,1,1"))


def test_every_data_flag_is_passed(synthetic_root: Path) -> None:
    config = HybridConfig(
        dataset="sem_seg||correct_refer_seg||neg_refer_seg||vqa", sample_rates="1,1,1,1",
        sem_seg_data="mapillary", correct_refer_seg_data="fprefcoco+", neg_refer_seg_data="R-refcoco",
        num_classes_per_sample=2, template="vicuna_v1",
    )
    mix = HybridDataset(synthetic_root, config=config, samples_per_epoch=4, rank=0)
    sem, correct, neg, vqa = mix.sources
    assert isinstance(sem, SemSegDataset) and sem.names == ["mapillary"] and sem.num_classes_per_sample == 2
    assert isinstance(correct, ReferSegDataset) and correct.names == ["fprefcoco+"]
    assert isinstance(neg, ReferSegDataset) and neg.names == ["R-refcoco"]
    assert isinstance(vqa, VQADataset) and vqa.template == "vicuna_v1"
    assert len(mix) == 4


# ------------------------------------------------------------------------------------------ sampling


def test_sampling_ratios_hold(full_mix: HybridDataset) -> None:
    n = 6000
    counts = np.bincount([full_mix.source_index(i) for i in range(n)], minlength=6)
    expected = n * full_mix.probs
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5, (counts, expected)  # 99.9% quantile of chi-square with 5 degrees of freedom
    assert full_mix.probs.tolist() == pytest.approx([10 / 24, 1 / 24, 1 / 24, 1 / 24, 1 / 24, 10 / 24])


def test_items_come_from_the_chosen_source(full_mix: HybridDataset) -> None:
    markers = {"sem_seg": ("ade20k", "coco/train2017/0000001", "mapillary", "coco/train2017/0000002", "pascal_part"),
               "refer_seg": ("refer_seg/images",), "correct_refer_seg": ("refer_seg/images",),
               "neg_refer_seg": ("refer_seg/images",), "vqa": ("coco/train2017/0000003",),
               "reason_seg": ("reason_seg/ReasonSeg/train",)}
    seen = set()
    for idx in range(12):
        name = full_mix.names[full_mix.source_index(idx)]
        item = full_mix[idx]
        assert any(m in item[0] for m in markers[name]), (name, item[0])
        assert sum(c.count("[SEG]") for c in item[3]) == item[4].shape[0]
        seen.add(name)
    assert {"sem_seg", "reason_seg"} <= seen


def _signature(item: tuple) -> tuple:
    return item[0], tuple(item[3]), tuple(item[4].shape)


def test_ranks_differ_and_each_rank_is_reproducible(synthetic_root: Path, full_mix: HybridDataset) -> None:
    again = HybridDataset(synthetic_root, config=full_mix.config, samples_per_epoch=64, seed=42, rank=0)
    other = HybridDataset(synthetic_root, config=full_mix.config, samples_per_epoch=64, seed=42, rank=1)
    idxs = range(6)
    rank0 = [_signature(full_mix[i]) for i in idxs]
    assert [_signature(again[i]) for i in reversed(idxs)][::-1] == rank0  # order of fetching does not matter
    a, b = full_mix[2], again[2]
    assert torch.equal(a[1], b[1]) and torch.equal(a[4], b[4])
    rank1 = [_signature(other[i]) for i in idxs]
    assert sum(x != y for x, y in zip(rank0, rank1)) >= 4
    choices0 = [full_mix.source_index(i) for i in range(200)]
    assert choices0 != [other.source_index(i) for i in range(200)]


def test_epochs_draw_new_samples(synthetic_root: Path, full_mix: HybridDataset) -> None:
    mix = HybridDataset(synthetic_root, config=full_mix.config, samples_per_epoch=64, seed=42, rank=0)
    before = [mix.source_index(i) for i in range(200)]
    mix.set_epoch(1)
    after = [mix.source_index(i) for i in range(200)]
    assert before != after
    mix.set_epoch(0)
    assert [mix.source_index(i) for i in range(200)] == before
