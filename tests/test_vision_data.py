"""Image data on the real files: ImageNet labels by wnid (725 classes present), the models' own
transforms, seeded calibration draws, the Hugging Face path, the MNIST split, the accuracy loop."""

import pytest
import timm.data
import torch
from omegaconf import OmegaConf
from torch import nn

from fqbench.data import imagenet, mnist
from fqbench.data.vision import calibration_images, evaluation_subset, load_split
from fqbench.eval.imagenet import evaluate_classifier
from fqbench.models.timm import load_timm_model
from vision_helpers import model_config


def data_cfg(root, **extra):
    return OmegaConf.create({"root": str(root), "imagenet": "imagenet", "imagenet_hf": None, "mnist": "mnist", **extra})


def test_val_labels_come_from_the_wnid_list_not_the_folder_order(data_root):
    wnids = imagenet.synsets(data_root / "imagenet")
    val = load_split("imagenet", data_cfg(data_root), "val", None)
    assert len(val.classes) == 725 and len(val) == 1300
    for path, label in val.samples:
        assert wnids[label] == path.parent.name
    folder_order = {wnid: i for i, wnid in enumerate(val.classes)}
    assert any(folder_order[path.parent.name] != label for path, label in val.samples)
    assert wnids == imagenet.synsets(None)  # the shipped list and timm's copy agree (ImageNet-1k order)
    assert wnids[0] == "n01440764" and wnids[999] == "n15075141"


def test_train_file_names_name_their_true_class(data_root):
    """Training files are called ``<wnid>_<class name>.JPEG``: both must agree with the label."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    train = load_split("imagenet", data_cfg(data_root), "train", None)
    assert len(train) == 125
    for path, label in train.samples:
        wnid, _, name = path.stem.partition("_")
        assert info.index_to_label_name(label) == wnid
        assert name.split("_")[0].lower() in info.index_to_description(label).lower().replace(" ", "_")


@pytest.mark.parametrize("name", ["vit_t", "vit_s32", "swin_b384", "deit3_h"])
def test_transforms_give_the_models_input_size(data_root, name):
    with torch.device("meta"):
        model = load_timm_model(model_config(name))
    config = timm.data.resolve_model_data_config(model)
    transform = timm.data.create_transform(**config, is_training=False)
    val = load_split("imagenet", data_cfg(data_root), "val", transform)
    image, label = val[0]
    assert tuple(image.shape) == tuple(model.pretrained_cfg["input_size"]) == tuple(config["input_size"])
    assert image.dtype == torch.float32 and 0 <= label < 1000


def test_calibration_draw_is_seeded_and_checked(data_root):
    transform = timm.data.create_transform(input_size=(3, 32, 32), crop_pct=1.0)
    train = load_split("imagenet", data_cfg(data_root), "train", transform)
    a, b, c = (calibration_images(train, 8, seed) for seed in (0, 0, 1))
    assert a.shape == (8, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="calib.nsamples=128 but the training split has only 125 images"):
        calibration_images(train, 128, seed=0)
    subset = evaluation_subset(load_split("imagenet", data_cfg(data_root), "val", transform), 64)
    assert len(subset) == 64 and subset.indices == sorted(subset.indices)


def test_missing_data_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no ImageNet folder at {tmp_path}/imagenet/val.*data.root"):
        load_split("imagenet", data_cfg(tmp_path), "val", None)
    with pytest.raises(FileNotFoundError, match="data.imagenet=imagenet is relative but data.root is not set"):
        load_split("imagenet", OmegaConf.create({"root": None, "imagenet": "imagenet", "imagenet_hf": None}), "val", None)
    with pytest.raises(FileNotFoundError, match="no MNIST file at .*t10k-images-idx3-ubyte.gz"):
        load_split("mnist", data_cfg(tmp_path), "train", None)
    (tmp_path / "imagenet" / "val" / "not_a_wnid").mkdir(parents=True)
    with pytest.raises(ValueError, match="not ImageNet-1k wnids"):
        load_split("imagenet", data_cfg(tmp_path), "val", None)
    with pytest.raises(ValueError, match="unknown image dataset 'cifar'"):
        load_split("cifar", data_cfg(tmp_path), "val", None)


def test_hugging_face_imagenet_from_a_local_copy(data_root, tmp_path):
    """The ``imagenet-1k`` path: a DatasetDict with ``image``/``label`` (ImageNet-1k indices) saved to disk."""
    import datasets

    folder = load_split("imagenet", data_cfg(data_root), "val", None)
    rows = [folder.samples[i] for i in range(0, len(folder), 200)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=imagenet.synsets())})
    split = datasets.Dataset.from_dict({"image": [str(p) for p, _ in rows], "label": [l for _, l in rows]},
                                       features=features)
    datasets.DatasetDict({"train": split, "validation": split}).save_to_disk(str(tmp_path / "hf"))
    transform = timm.data.create_transform(input_size=(3, 32, 32), crop_pct=1.0)
    hf = load_split("imagenet", data_cfg(data_root, imagenet_hf=str(tmp_path / "hf")), "val", transform)
    assert len(hf) == len(rows)
    for i, (path, label) in enumerate(rows):
        image, got = hf[i]
        assert got == label and image.shape == (3, 32, 32)
        assert torch.equal(image, transform(folder[folder.samples.index((path, label))][0]))


def test_mnist_split_is_fixed_disjoint_and_labelled(data_root):
    train = load_split("mnist", data_cfg(data_root), "train", None)
    val = load_split("mnist", data_cfg(data_root), "val", None)
    assert (len(train), len(val)) == (mnist.TRAIN_IMAGES, 10000 - mnist.TRAIN_IMAGES)
    assert not set(train.indices) & set(val.indices)
    image, label = val[0]
    assert image.size == (28, 28) and image.mode == "L" and 0 <= label <= 9
    labels = torch.tensor([val[i][1] for i in range(len(val))])
    assert torch.bincount(labels, minlength=10).min() > 100  # every digit is represented


class FixedLogits(nn.Module):
    """Scores class ``(label + shift) % 10`` highest, then the true label: predictions known in advance."""

    def __init__(self, shift):
        super().__init__()
        self.shift = shift

    def forward(self, x):
        labels = x[:, 0].long()
        logits = torch.zeros(len(x), 10)
        logits[torch.arange(len(x)), labels] = 1.0
        logits[torch.arange(len(x)), (labels + self.shift) % 10] += 2.0 * (labels % 2 == 0)
        return logits


def test_accuracy_loop_counts_top1_and_top5():
    data = [(torch.tensor([float(i % 10)]), i % 10) for i in range(40)]
    assert evaluate_classifier(FixedLogits(0), data, device="cpu", batch_size=7, progress=False) == \
        {"top1": 100.0, "top5": 100.0, "images": 40}
    result = evaluate_classifier(FixedLogits(3), data, device="cpu", batch_size=16, progress=False)
    assert result == {"top1": 50.0, "top5": 100.0, "images": 40}  # even labels: the true class is second
