import pytest

from projects.pretrain import eval_split


def test_online_knn_split_is_the_one_given_or_the_val_beside_train(tiles, tmp_path):
    assert eval_split(str(tiles / "train"), "") == tiles / "val"
    assert eval_split(str(tiles / "train"), str(tiles / "train")) == tiles / "train"
    assert eval_split(str(tiles / "val"), "") is None  # not a train folder: no guess
    with pytest.raises(FileNotFoundError, match="eval_data: .* is not a directory"):
        eval_split(str(tiles / "train"), str(tmp_path / "missing"))


def test_a_val_split_unlike_the_training_classes_is_not_guessed(tiles, tmp_path):
    (tmp_path / "train" / "only").mkdir(parents=True)
    (tmp_path / "val" / "only").mkdir(parents=True)
    for split in ("train", "val"):
        png = next((tiles / split).rglob("*.png"))
        (tmp_path / split / "only" / png.name).write_bytes(png.read_bytes())
    assert eval_split(str(tmp_path / "train"), "") is None  # one class: nothing to classify
