"""Real data for the bank: refused early with a clear message, loaded as the teacher saw it, and
fingerprinted so that a changed dataset never reuses a bank built from the old one."""
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dire_plugin.embeddings.bank import RealEmbeddingBank
from dire_plugin.errors import DiReInputError
from dire_plugin.embeddings.realdata import RealDataSpec
from dire_plugin.embeddings.realdata import check_real_data, data_fingerprint, open_torchvision_cifar, real_data_loader
from lookalike import write_image_folder

SPEC = RealDataSpec("imagefolder", crop=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
CIFAR100 = RealDataSpec("cifar100", crop=32, mean=(0.5,) * 3, std=(0.25,) * 3)
CIFAR10 = RealDataSpec("cifar10", crop=32, mean=(0.5,) * 3, std=(0.25,) * 3)
CIFAR100_FILES = ("train", "test", "meta")
CIFAR10_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                 "test_batch", "batches.meta")


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text and "Traceback" not in text, text
    return text


def _cifar_folder(root, folder, names, content=b"not the real file"):
    (root / folder).mkdir(parents=True)
    for name in names:
        (root / folder / name).write_bytes(content)
    return root


# --- check_real_data --------------------------------------------------------------------------


def test_missing_folder_file_and_empty_folder_are_refused(tmp_path):
    with pytest.raises(DiReInputError, match="does not exist"):
        check_real_data(tmp_path / "nope", SPEC, 3)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(DiReInputError, match="a_file is a file, not a folder"):
        check_real_data(tmp_path / "a_file", SPEC, 3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiReInputError, match="one folder per class"):
        check_real_data(tmp_path / "empty", SPEC, 3)
    with pytest.raises(DiReInputError, match=r"cifar-100-python/ \(torchvision layout\)"):
        check_real_data(tmp_path / "empty", CIFAR100, 100)


def test_class_folders_without_any_image_are_refused(tmp_path):
    for name in ("ant", "bee"):
        (tmp_path / "real" / name).mkdir(parents=True)
        (tmp_path / "real" / name / "notes.txt").write_text("no image here")
    with pytest.raises(DiReInputError, match=r"holds no images.*2 class folders") as e:
        check_real_data(tmp_path / "real", SPEC, 2)
    _one_line(e)


def test_a_class_folder_without_an_image_is_named(tmp_path):
    root = write_image_folder(tmp_path / "real", num_classes=3, per_class=2, size=8)
    for f in (root / "class_001").iterdir():
        f.unlink()
    (root / "class_001" / "readme.txt").write_text("moved away")
    with pytest.raises(DiReInputError) as e:
        check_real_data(root, SPEC, 3)
    assert f"class folder {root.resolve() / 'class_001'} holds no image" in _one_line(e)


def test_images_in_subfolders_count_as_the_loader_reads_them(tmp_path):
    root = write_image_folder(tmp_path / "real", num_classes=2, per_class=1, size=8)
    (root / "class_001" / "nested").mkdir()
    (root / "class_001" / "img_0.png").rename(root / "class_001" / "nested" / "img_0.png")
    assert check_real_data(root, SPEC, 2) == root.resolve()
    _truncate(root / "class_001" / "nested" / "img_0.png")
    with pytest.raises(DiReInputError, match="nested/img_0.png"):
        check_real_data(root, SPEC, 2)


def test_unreadable_first_image_is_named(tmp_path):
    root = write_image_folder(tmp_path / "real", num_classes=3, per_class=2, size=8)
    _truncate(root / "class_002" / "img_0.png")
    with pytest.raises(DiReInputError) as e:
        check_real_data(root, SPEC, 3)
    assert str(root.resolve() / "class_002" / "img_0.png") in _one_line(e)
    (root / "class_000" / "img_0.png").write_bytes(b"")
    with pytest.raises(DiReInputError, match=r"class_000/img_0\.png"):
        check_real_data(root, SPEC, 3)
    (root / "class_000" / "img_0.png").unlink()
    (root / "class_000" / "img_0.png").symlink_to(tmp_path / "gone.png")  # the loader lists it too
    with pytest.raises(DiReInputError, match=r"class_000/img_0\.png cannot be read") as e:
        check_real_data(root, SPEC, 3)
    _one_line(e)


def test_images_that_are_all_empty_files_are_named_not_the_class_count(tmp_path):
    root = write_image_folder(tmp_path / "real", num_classes=3, per_class=2, size=8)
    for image in root.rglob("*.png"):
        image.write_bytes(b"")
    with pytest.raises(DiReInputError) as e:
        check_real_data(root, SPEC, 100)  # the count does not fit either: the files are the problem
    assert _one_line(e) == (f"real image {root.resolve() / 'class_000' / 'img_0.png'} is an empty file (0 bytes): "
                            "replace or remove it")


@pytest.fixture
def no_hang():
    """Fail, not hang, when something opens a FIFO for reading (the alarm interrupts the open)."""
    import signal

    def alarm(signum, frame):
        raise TimeoutError("blocked on a FIFO")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, 20)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def test_a_fifo_named_like_an_image_is_refused_never_opened(tmp_path, no_hang):
    root = write_image_folder(tmp_path / "real", num_classes=3, per_class=2, size=8)
    fifo = root / "class_001" / "zz_pipe.png"  # not the first image of its class
    os.mkfifo(fifo)
    with pytest.raises(DiReInputError) as e:
        check_real_data(root, SPEC, 3)
    assert _one_line(e) == f"real image {root.resolve() / 'class_001' / 'zz_pipe.png'} is a FIFO, not an image file: " \
                           "remove it from the real data"
    fifo.unlink()
    # Deeper down or behind a link, the listing does not see it: the fingerprint's stat refuses it
    # before the loader opens anything.
    (root / "class_002" / "nested").mkdir()
    os.mkfifo(root / "class_002" / "nested" / "pipe.png")
    (root / "class_000" / "link.png").symlink_to(root / "class_002" / "nested" / "pipe.png")
    assert check_real_data(root, SPEC, 3) == root.resolve()
    with pytest.raises(DiReInputError, match=r"class_000/link\.png is a FIFO, not an image file") as e:
        real_data_loader(root, SPEC, num_classes=3, workers=0)
    _one_line(e)
    (root / "class_000" / "link.png").unlink()
    with pytest.raises(DiReInputError, match=r"class_002/nested/pipe\.png is a FIFO"):
        real_data_loader(root, SPEC, num_classes=3, workers=0)
    (root / "class_002" / "img_0.png").unlink()
    (root / "class_002" / "img_1.png").unlink()  # now the FIFO is the first image of class_002
    with pytest.raises(DiReInputError, match=r"class_002/nested/pipe\.png is a FIFO"):
        check_real_data(root, SPEC, 3)


def test_images_smaller_than_the_crop_are_warned_about_once_with_both_sizes(tmp_path, caplog, monkeypatch):
    import logging

    monkeypatch.setattr(logging.getLogger("dire"), "propagate", True)  # an activation earlier may have cut it
    crop32 = RealDataSpec("imagefolder", crop=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    small = write_image_folder(tmp_path / "small", num_classes=3, per_class=2, size=16)
    check_real_data(small, crop32, [3, 10])  # which script runs is not known yet: no warning
    assert "smaller than" not in caplog.text
    check_real_data(small, crop32, 3)
    real_data_loader(small, crop32, num_classes=3, workers=0)
    warnings = [r.getMessage() for r in caplog.records if "smaller than" in r.getMessage()]
    assert warnings == [f"[dire] warning: real image {small.resolve() / 'class_000' / 'img_0.png'} is 16x16 px, "
                        "smaller than the 32 px the script's teacher sees: the bank upscales such images to 32 px "
                        "(first image of each class checked); give the real data at the teacher's resolution"]
    caplog.clear()
    check_real_data(write_image_folder(tmp_path / "big", num_classes=3, per_class=1, size=32), crop32, 3)
    assert "smaller than" not in caplog.text


def test_class_count_int_collection_or_none(tmp_path):
    root = write_image_folder(tmp_path / "real", num_classes=3, per_class=1, size=8)
    with pytest.raises(DiReInputError, match="holds 3 classes, the teacher of this script has 10") as e:
        check_real_data(root, SPEC, 10)
    _one_line(e)
    assert check_real_data(root, SPEC, 3) == root.resolve()
    assert check_real_data(root, SPEC, None) == root.resolve()
    assert check_real_data(root, SPEC, {10, 3, 1000}) == root.resolve()
    assert check_real_data(root, SPEC, [3]) == root.resolve()
    with pytest.raises(DiReInputError, match=r"holds 3 classes; the covered scripts' teachers have 10, 100 or 1000"):
        check_real_data(root, SPEC, (1000, 10, 100, 10))
    # ImageFolder counts a hidden folder as a class, so the check does too (and names it).
    (root / ".ipynb_checkpoints").mkdir()
    with pytest.raises(DiReInputError, match=r"\.ipynb_checkpoints holds no image"):
        check_real_data(root, SPEC, 3)


def test_torchvision_cifar_layout_needs_its_files(tmp_path):
    root = _cifar_folder(tmp_path / "data", "cifar-100-python", ["train"])
    with pytest.raises(DiReInputError) as e:
        check_real_data(root, CIFAR100, 100)
    msg = _one_line(e)
    assert "cifar-100-python" in msg and "test, meta" in msg and "missing" in msg and "download=True" not in msg
    for name in ("test", "meta"):
        (root / "cifar-100-python" / name).write_bytes(b"x")
    # Present is enough here: torchvision checks the MD5 sums when it opens them.
    assert check_real_data(root, CIFAR100, 100) == root.resolve()
    assert check_real_data(root / "cifar-100-python", CIFAR100, {10, 100}) == (root / "cifar-100-python").resolve()
    with pytest.raises(DiReInputError, match="holds 100 classes, the teacher of this script has 10"):
        check_real_data(root, CIFAR100, 10)

    ten = _cifar_folder(tmp_path / "ten", "cifar-10-batches-py", CIFAR10_FILES[:-2])
    with pytest.raises(DiReInputError, match=r"cifar-10-batches-py.*test_batch, batches\.meta"):
        check_real_data(ten, CIFAR10, 10)


def test_corrupt_or_missing_cifar_is_our_message(tmp_path):
    root = _cifar_folder(tmp_path / "data", "cifar-100-python", CIFAR100_FILES)
    with pytest.raises(DiReInputError) as e:
        open_torchvision_cifar(root, "cifar100", train=True)
    msg = _one_line(e)
    assert str(root / "cifar-100-python") in msg and "corrupt" in msg and "never download" in msg
    assert "download=True" not in msg
    with pytest.raises(DiReInputError) as e:  # through the loader, after the presence check
        real_data_loader(root, CIFAR100, num_classes=100, workers=0)
    assert "download=True" not in _one_line(e)

    (root / "cifar-100-python" / "meta").unlink()
    with pytest.raises(DiReInputError) as e:
        open_torchvision_cifar(root, "cifar100", train=True)
    msg = _one_line(e)
    assert "meta" in msg and "missing" in msg and "download=True" not in msg


# --- the loader -------------------------------------------------------------------------------


def test_imagefolder_loads_with_the_scripts_preprocessing(tmp_path):
    root = write_image_folder(tmp_path / "real", num_classes=3, per_class=2, size=12)
    loader, dataset_id, transform_id = real_data_loader(root, SPEC, num_classes=3, workers=0)
    images, labels = next(iter(loader))
    assert images.shape == (6, 3, 8, 8) and sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]
    assert images.min() >= (0 - 0.5) / 0.25 - 1e-6 and images.max() <= (1 - 0.5) / 0.25 + 1e-6
    assert dataset_id.startswith("imagefolder:6:")
    # However the root is spelled (here: not resolved), the same dataset has the same id.
    assert dataset_id == data_fingerprint(loader.dataset, root, "imagefolder")
    assert dataset_id == data_fingerprint(loader.dataset, root.resolve(), "imagefolder")
    assert "CenterCrop" in transform_id and "Normalize" in transform_id


def test_class_count_must_match_the_teacher(tmp_path):
    root = write_image_folder(tmp_path / "real", num_classes=3, per_class=1, size=8)
    with pytest.raises(DiReInputError, match="holds 3 classes, the teacher of this script has 10"):
        real_data_loader(root, SPEC, num_classes=10, workers=0)


# --- the fingerprint: a changed dataset is a cache miss --------------------------------------


def _pixel_model():
    # Embedding = the normalised pixels, so a change in the images shows in the bank.
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))


def _bank(root, cache, workers=0):
    loader, dataset_id, transform_id = real_data_loader(root, SPEC, num_classes=3, batch_size=4, workers=workers)
    return RealEmbeddingBank.build(
        _pixel_model(), loader, cache_dir=cache, dataset_id=dataset_id, transform_id=transform_id, progress=False
    )


def _same(a, b):
    return a.classes == b.classes and all(torch.equal(a[c], b[c]) for c in a.classes)


def test_data_changed_in_place_is_a_cache_miss(tmp_path):
    root = write_image_folder(tmp_path / "real", num_classes=3, per_class=6, size=8)
    cache = tmp_path / "cache"
    first = _bank(root, cache)
    assert not first.cache_hit
    again = _bank(root, cache)
    assert again.cache_hit and _same(again, first), "untouched data must hit the cache"

    # Four images of class 000 move into class 001: same files, same total count.
    for i in range(4):
        os.rename(root / "class_000" / f"img_{i}.png", root / "class_001" / f"moved_{i}.png")
    moved = _bank(root, cache)
    assert not moved.cache_hit
    assert moved[0].shape[0] == 2 and moved[1].shape[0] == 10 and not _same(moved, first)
    assert _bank(root, cache).cache_hit

    # Class 002 blacked out: the same names and count, other content.
    for f in (root / "class_002").iterdir():
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(f)
    blacked = _bank(root, cache)
    assert not blacked.cache_hit and blacked[2].shape == moved[2].shape
    assert not torch.equal(blacked[2], moved[2]) and torch.equal(blacked[0], moved[0])
    assert len(set(blacked[2].flatten().tolist())) == 1, "class 2 should be the black images now"


def test_the_python_api_keys_an_imagefolder_cache_on_its_data_by_itself(tmp_path, caplog):
    # RealEmbeddingBank.build(model, loader, cache_dir=...) as README shows it: no dataset_id.
    from torchvision import datasets, transforms

    root = write_image_folder(tmp_path / "real", num_classes=3, per_class=4, size=8)
    cache = tmp_path / "cache"

    def bank():
        ds = datasets.ImageFolder(str(root), transform=transforms.ToTensor())
        return RealEmbeddingBank.build(_pixel_model(), torch.utils.data.DataLoader(ds, batch_size=4),
                                       cache_dir=cache, progress=False)

    first = bank()
    assert bank().cache_hit
    os.rename(root / "class_000" / "img_0.png", root / "class_001" / "moved_0.png")
    moved = bank()
    assert not moved.cache_hit and moved[0].shape[0] == 3 and moved[1].shape[0] == 5 and not _same(moved, first)
    assert "cannot see" not in caplog.text


def test_a_cache_the_key_cannot_see_the_data_of_is_warned_about(tmp_path, caplog):
    data = torch.utils.data.TensorDataset(torch.rand(6, 3, 8, 8), torch.arange(3).repeat(2))
    RealEmbeddingBank.build(_pixel_model(), torch.utils.data.DataLoader(data, batch_size=3),
                            cache_dir=tmp_path / "cache", progress=False)
    assert "pass dataset_id=" in caplog.text and "TensorDataset" in caplog.text


def test_fingerprint_sees_size_mtime_class_names_and_files(tmp_path):
    root = write_image_folder(tmp_path / "real", num_classes=2, per_class=2, size=8)
    loader, dataset_id, _ = real_data_loader(root, SPEC, num_classes=2, workers=0)
    ds = loader.dataset

    def fp():
        from torchvision import datasets

        return data_fingerprint(datasets.ImageFolder(str(root.resolve())), root.resolve(), "imagefolder")

    assert fp() == dataset_id
    assert data_fingerprint(ds, root.resolve(), "cifar100") != dataset_id, "the kind is part of it"
    img = root / "class_001" / "img_1.png"
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert fp() != dataset_id, "an mtime change must change the fingerprint"
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fp() == dataset_id
    shutil.move(str(root / "class_001"), str(root / "class_zzz"))  # class renamed, files kept
    assert fp() != dataset_id


def test_cifar_fingerprint_covers_its_files(tmp_path):
    root = _cifar_folder(tmp_path / "data", "cifar-10-batches-py", CIFAR10_FILES, b"x" * 10)

    class FakeCifar:  # what torchvision's CIFAR10 exposes, without its MD5 check
        from torchvision.datasets import CIFAR10 as _cls

        base_folder, train_list, test_list, meta = _cls.base_folder, _cls.train_list, _cls.test_list, _cls.meta
        classes = [str(i) for i in range(10)]
        train = True

        def __init__(self):
            self.root = str(root)

        def __len__(self):
            return 50000

    first = data_fingerprint(FakeCifar(), root, "cifar10")
    assert first.startswith("cifar10:50000:") and data_fingerprint(FakeCifar(), root, "cifar10") == first
    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"y" * 11)
    assert data_fingerprint(FakeCifar(), root, "cifar10") != first


# --- unreadable images while the bank is built ------------------------------------------------


@pytest.mark.parametrize("workers", [0, 1])
def test_truncated_image_during_build_is_one_line_naming_it(tmp_path, workers):
    root = write_image_folder(tmp_path / "real", num_classes=3, per_class=3, size=8)
    bad = root / "class_001" / "img_2.png"  # not a first image, so check_real_data passes
    _truncate(bad)
    with pytest.raises(DiReInputError) as e:
        _bank(root, tmp_path / "cache", workers=workers)
    msg = _one_line(e)
    assert str(bad.resolve()) in msg and "worker" not in msg
    assert not list(tmp_path.glob("cache/bank-*.pt")), "no bank may be cached from a failed build"
