"""Dataset readers against tiny generated datasets in each standard layout."""

from __future__ import annotations

import re
from pathlib import Path

import eval_fixtures as fx
import numpy as np
import pytest
from PIL import Image

from lava.errors import LavaError
from lava.evaluation import DATASET_NAMES, DatasetError, SegmentationDataset, dataset_info, load_dataset
from lava.evaluation import classnames as cn


def _reduce_zero(raw: np.ndarray) -> np.ndarray:
    """Independent statement of mmseg's reduce_zero_label: 0 -> 255, k -> k - 1, 255 stays."""
    out = raw.astype(np.int64) - 1
    out[raw == 0] = 255
    out[raw == 255] = 255
    return out


def _assert_pairs(dataset: SegmentationDataset, fake: fx.FakeDataset, mapping) -> None:
    """Every sample: right id order, right files, image is its own colour, label mapped as expected."""
    assert [s.id for s in dataset] == fake.ids
    for sample in dataset:
        assert sample.image_path == fake.image_paths[sample.id]
        assert sample.label_path == fake.label_paths[sample.id]
        image = sample.image
        assert image.mode == "RGB" and image.size == (fx.W, fx.H)
        mean = np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(axis=0)
        np.testing.assert_allclose(mean, fake.colors[sample.id], atol=3)
        label = sample.label
        assert label.dtype == np.uint8 and label.shape == (fx.H, fx.W)
        np.testing.assert_array_equal(label, mapping(fake.raw_labels[sample.id]))


# ------------------------------------------------------------------------------------------------
# Class tables


@pytest.mark.parametrize(
    ("name", "count", "background", "first", "last"),
    [
        ("voc21", 21, 0, "background", "tvmonitor"),
        ("voc", 21, 0, "background", "tvmonitor"),
        ("voc20", 20, None, "aeroplane", "tvmonitor"),
        ("context59", 59, None, "aeroplane", "wood"),
        ("context60", 60, 0, "background", "wood"),
        ("coco_object", 81, 0, "background", "toothbrush"),
        ("ade20k", 150, None, "wall", "flag"),
        ("cityscapes", 19, None, "road", "bicycle"),
    ],
)
def test_class_tables(name: str, count: int, background: int | None, first: str, last: str) -> None:
    info = dataset_info(name)
    assert info.num_classes == len(info.classes) == len(info.prompt_names) == count
    assert len(set(info.classes)) == count
    assert info.background == background and info.ignore_index == 255
    assert (info.classes[0], info.classes[-1]) == (first, last)
    assert all(name == name.strip() and name for name in info.prompt_names)


def test_class_table_details() -> None:
    assert cn.CONTEXT60_CLASSES[1:] == cn.CONTEXT59_CLASSES
    assert cn.VOC21_CLASSES[1:] == cn.VOC20_CLASSES
    assert list(cn.CONTEXT59_CLASSES) == sorted(cn.CONTEXT59_CLASSES)  # mmseg converter order
    assert cn.ADE20K_CLASSES[7] == "bed"  # mmseg's "bed " with the stray space removed
    voc = dataset_info("voc21")
    assert voc.prompt_names[voc.classes.index("pottedplant")] == "potted plant"
    assert voc.prompt_names[voc.classes.index("tvmonitor")] == "tv monitor"
    assert voc.prompt_names[voc.classes.index("diningtable")] == "dining table"
    coco = dataset_info("coco_object")
    assert coco.classes[1] == "person" and coco.classes.index("toothbrush") == 80


def test_unknown_dataset_name_lists_known_ones(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"unknown dataset 'pascal'.*voc20"):
        load_dataset("pascal", tmp_path)
    assert issubclass(DatasetError, LavaError) and issubclass(DatasetError, ValueError)  # CLI catches these
    assert set(DATASET_NAMES) >= {
        "voc",
        "voc21",
        "voc20",
        "context59",
        "context60",
        "coco_object",
        "ade20k",
        "cityscapes",
    }


# ------------------------------------------------------------------------------------------------
# Each layout


@pytest.mark.parametrize("point_at", ["parent", "devkit", "year"])
def test_voc21_reads_pairs_from_any_root_level(tmp_path: Path, point_at: str) -> None:
    fake = fx.make_voc(tmp_path, point_at=point_at)
    dataset = load_dataset("voc", fake.root)
    assert dataset.info.name == "voc21" and len(dataset) == 3
    assert dataset.root == tmp_path / "VOCdevkit" / "VOC2012"
    _assert_pairs(dataset, fake, lambda raw: raw)  # palette indices are the class ids


def test_voc20_drops_background(tmp_path: Path) -> None:
    fake = fx.make_voc(tmp_path)
    dataset = load_dataset("voc20", fake.root)
    _assert_pairs(dataset, fake, _reduce_zero)
    label = dataset[0].label
    assert label[1, 1] == 255  # raw background
    assert label[-2, -2] == 14  # raw 15 = person -> 14
    assert dataset.info.classes[label[-2, -2]] == "person"


def test_voc_split_selects_ids(tmp_path: Path) -> None:
    fx.make_voc(tmp_path, split="val")
    with pytest.raises(DatasetError, match=r"2008_999999\.jpg"):  # train.txt lists an id with no files
        load_dataset("voc", tmp_path, split="train")


def test_context60_keeps_background_and_context59_reduces_zero(tmp_path: Path) -> None:
    fake = fx.make_context(tmp_path)
    c60 = load_dataset("context60", fake.root)
    c59 = load_dataset("context59", tmp_path / "VOCdevkit" / "VOC2010")
    _assert_pairs(c60, fake, lambda raw: raw)
    _assert_pairs(c59, fake, _reduce_zero)
    assert c59[0].label[-1, -1] == 29 and c59.info.classes[29] == c60.info.classes[30]


@pytest.mark.parametrize("container", ["", "coco_stuff164k", "coco_object"])
def test_coco_object(tmp_path: Path, container: str) -> None:
    fake = fx.make_coco_object(tmp_path, container=container)
    dataset = load_dataset("coco_object", fake.root)
    _assert_pairs(dataset, fake, lambda raw: raw)
    assert dataset[0].id == "000000000139"


def test_ade20k_reduce_zero(tmp_path: Path) -> None:
    fake = fx.make_ade20k(tmp_path)
    dataset = load_dataset("ade20k", fake.root, split="val")
    _assert_pairs(dataset, fake, _reduce_zero)
    label = dataset[2].label  # quadrants raw (0, 3, 148, 75)
    assert (label[0, 0], label[0, -1], label[-1, 0], label[-1, -1]) == (255, 2, 147, 74)


def test_ade20k_root_may_be_challenge_dir(tmp_path: Path) -> None:
    fake = fx.make_ade20k(tmp_path, point_at_challenge_dir=True)
    _assert_pairs(load_dataset("ade20k", fake.root, split="validation"), fake, _reduce_zero)


def test_cityscapes_walks_city_folders(tmp_path: Path) -> None:
    fake = fx.make_cityscapes(tmp_path, cities=("aachen", "bochum"), per_city=1)
    dataset = load_dataset("cityscapes", fake.root)
    assert [s.id for s in dataset] == ["aachen_000000_000019", "bochum_000000_000019"]
    _assert_pairs(dataset, fake, lambda raw: raw)
    assert dataset[0].label[-1, -1] == 255


def test_sequence_behaviour_and_load(tmp_path: Path) -> None:
    fake = fx.make_ade20k(tmp_path)
    dataset = load_dataset("ade20k", fake.root)
    assert dataset[-1].id == fake.ids[-1]
    head = dataset[:2]
    assert isinstance(head, SegmentationDataset) and len(head) == 2 and head.info == dataset.info
    with pytest.raises(IndexError):
        dataset[3]
    image, label = dataset[1].load()
    assert image.size == (fx.W, fx.H) and label.shape == (fx.H, fx.W)


# ------------------------------------------------------------------------------------------------
# Errors: each names the file concerned


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"root does not exist.*nowhere"):
        load_dataset("voc", tmp_path / "nowhere")


def test_wrong_layout_names_expected_folder(tmp_path: Path) -> None:
    fx.make_ade20k(tmp_path)
    with pytest.raises(DatasetError, match=r"ImageSets/Segmentation.*expected layout: ROOT/JPEGImages"):
        load_dataset("voc", tmp_path)


def test_missing_split_file(tmp_path: Path) -> None:
    fake = fx.make_voc(tmp_path)
    with pytest.raises(DatasetError, match=r"split file is missing: .*trainval\.txt.*'train', 'val'"):
        load_dataset("voc", fake.root, split="trainval")


def test_unknown_split_name(tmp_path: Path) -> None:
    fx.make_ade20k(tmp_path)
    with pytest.raises(DatasetError, match="unknown split 'test'"):
        load_dataset("ade20k", tmp_path, split="test")


@pytest.mark.parametrize("which", ["image", "label"])
def test_missing_file_fails_at_load_time(tmp_path: Path, which: str) -> None:
    fake = fx.make_voc(tmp_path)
    paths = fake.image_paths if which == "image" else fake.label_paths
    victim = paths[fake.ids[1]]
    victim.unlink()
    with pytest.raises(DatasetError, match=f"{which} file is missing: {re.escape(str(victim))}.*1 of 3"):
        load_dataset("voc", fake.root)


def test_missing_coco_object_label_suggests_conversion(tmp_path: Path) -> None:
    fake = fx.make_coco_object(tmp_path)
    label = fake.label_paths[fake.ids[0]]
    label.rename(label.with_name(f"{fake.ids[0]}_labelTrainIds.png"))
    with pytest.raises(DatasetError, match=r"_instanceTrainIds\.png.*convert_coco_object"):
        load_dataset("coco_object", fake.root)


def test_empty_image_folder(tmp_path: Path) -> None:
    (tmp_path / "images" / "validation").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"no \.jpg images in .*validation"):
        load_dataset("ade20k", tmp_path)


@pytest.mark.parametrize("damage", [fx.write_garbage, fx.truncate])
def test_corrupt_image_names_file(tmp_path: Path, damage) -> None:
    fake = fx.make_voc(tmp_path)
    dataset = load_dataset("voc", fake.root)  # indexing reads no pixels
    victim = fake.image_paths[fake.ids[0]]
    damage(victim)
    with pytest.raises(DatasetError, match=f"image {re.escape(str(victim))}"):
        _ = dataset[0].image
    with pytest.raises(DatasetError, match=f"image {re.escape(str(victim))}"):
        dataset[0].load()
    assert dataset[1].image.size == (fx.W, fx.H)  # the others are untouched


@pytest.mark.parametrize("damage", [fx.write_garbage, fx.truncate])
def test_corrupt_label_names_file(tmp_path: Path, damage) -> None:
    fake = fx.make_ade20k(tmp_path)
    dataset = load_dataset("ade20k", fake.root)
    victim = fake.label_paths[fake.ids[1]]
    damage(victim)
    with pytest.raises(DatasetError, match=f"label {re.escape(str(victim))}"):
        _ = dataset[1].label


def test_size_mismatch_names_both_files(tmp_path: Path) -> None:
    fake = fx.make_cityscapes(tmp_path)
    sid = fake.ids[0]
    fx.write_label(fake.label_paths[sid], np.zeros((fx.H, fx.W - 4), dtype=np.uint8))
    sample = load_dataset("cityscapes", fake.root)[0]
    image, label = (re.escape(str(p[sid])) for p in (fake.image_paths, fake.label_paths))
    pattern = f"image {image} is 24x16.*label {label} is 20x16"
    for access in (lambda: sample.image, lambda: sample.label, sample.load):
        with pytest.raises(DatasetError, match=pattern):
            access()


def test_label_value_outside_encoding_is_an_error(tmp_path: Path) -> None:
    # e.g. Cityscapes labelIds (up to 33) saved where train ids (0..18) are expected
    fake = fx.make_cityscapes(tmp_path)
    sid = fake.ids[1]
    fx.write_label(fake.label_paths[sid], fx.quadrant_label((7, 26, 33, 0)))
    sample = load_dataset("cityscapes", fake.root)[1]
    expected = r"label .*labelTrainIds\.png holds values \[26, 33\].*0\.\.18, 255"
    with pytest.raises(DatasetError, match=expected):
        _ = sample.label


def test_colour_label_is_rejected(tmp_path: Path) -> None:
    fake = fx.make_voc(tmp_path)
    victim = fake.label_paths[fake.ids[0]]
    Image.open(victim).convert("RGB").save(victim)
    with pytest.raises(DatasetError, match=f"label {re.escape(str(victim))} has PIL mode 'RGB'"):
        _ = load_dataset("voc", fake.root)[0].label
