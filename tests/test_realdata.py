"""Real data for the bank: refused early with a clear message, loaded as the teacher saw it."""
import pytest

from dire_plugin.errors import DiReInputError
from dire_plugin.patching import RealDataSpec
from dire_plugin.realdata import check_real_data, real_data_loader
from lookalike import write_image_folder

SPEC = RealDataSpec("imagefolder", crop=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def test_missing_folder_and_empty_folder_are_refused(tmp_path):
    with pytest.raises(DiReInputError, match="does not exist"):
        check_real_data(tmp_path / "nope", SPEC)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiReInputError, match="one folder per class"):
        check_real_data(tmp_path / "empty", SPEC)
    cifar = RealDataSpec("cifar100", crop=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    with pytest.raises(DiReInputError, match=r"cifar-100-python/ \(torchvision layout\)"):
        check_real_data(tmp_path / "empty", cifar)


def test_imagefolder_loads_with_the_scripts_preprocessing(tmp_path):
    root = write_image_folder(tmp_path / "real", num_classes=3, per_class=2, size=12)
    loader, dataset_id, transform_id = real_data_loader(root, SPEC, num_classes=3, workers=0)
    images, labels = next(iter(loader))
    assert images.shape == (6, 3, 8, 8) and sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]
    assert images.min() >= (0 - 0.5) / 0.25 - 1e-6 and images.max() <= (1 - 0.5) / 0.25 + 1e-6
    assert "imagefolder" in dataset_id and "6" in dataset_id.split(":")[-1]
    assert "CenterCrop" in transform_id and "Normalize" in transform_id


def test_class_count_must_match_the_teacher(tmp_path):
    root = write_image_folder(tmp_path / "real", num_classes=3, per_class=1, size=8)
    with pytest.raises(DiReInputError, match="holds 3 classes, the teacher of this script has 10"):
        real_data_loader(root, SPEC, num_classes=10, workers=0)


def test_corrupt_cifar_folder_is_a_clear_error(tmp_path):
    (tmp_path / "cifar-100-python").mkdir()
    (tmp_path / "cifar-100-python" / "train").write_bytes(b"not a pickle")
    cifar = RealDataSpec("cifar100", crop=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    # torchvision checks the published MD5 sums before unpickling anything
    with pytest.raises(DiReInputError, match="cifar-100-python"):
        real_data_loader(tmp_path, cifar, num_classes=100, workers=0)
