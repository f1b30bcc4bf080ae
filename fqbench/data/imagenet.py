"""ImageNet-1k: an ImageFolder tree or the Hugging Face ``imagenet-1k`` dataset.

Folder layout: ``<data.imagenet>/train/<wnid>/*.JPEG`` and ``<data.imagenet>/val/<wnid>/*.JPEG``.
Class indices come from the 1,000-wnid list in ImageNet-1k order
(``imagenet_synsets.txt`` in the folder, else the copy timm ships), never from
the order of the folders: a folder with a subset of the classes still gets the
right labels. With ``data.imagenet_hf`` set (a hub name such as
``ILSVRC/imagenet-1k`` or a ``save_to_disk`` folder) the ``train`` and
``validation`` splits of that dataset are used instead; their labels are
already ImageNet-1k indices.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from fqbench.data.vision import resolve_path

SYNSETS_FILE = "imagenet_synsets.txt"
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
HF_SPLITS = {"train": "train", "val": "validation"}


def load_split(data_cfg, split: str, transform) -> Dataset:
    if split not in HF_SPLITS:
        raise ValueError(f"split={split!r}; use one of {tuple(HF_SPLITS)}")
    if data_cfg.get("imagenet_hf"):
        return HFImageNet(hf_split(str(data_cfg.imagenet_hf), HF_SPLITS[split]), transform)
    root = resolve_path(data_cfg, "imagenet", "an ImageNet folder with train/<wnid>/ and val/<wnid>/")
    return ImageFolderByWnid(root / split, synsets(root), transform)


def synsets(root: Path | None = None) -> list[str]:
    """The 1,000 ImageNet-1k wnids in class-index order."""
    if root is not None and (root / SYNSETS_FILE).is_file():
        names = (root / SYNSETS_FILE).read_text().split()
    else:
        from timm.data import ImageNetInfo

        names = list(ImageNetInfo().label_names())
    if len(names) != 1000 or len(set(names)) != 1000:
        raise ValueError(f"{root / SYNSETS_FILE if root else 'the synset list'} has {len(names)} entries "
                         f"({len(set(names))} distinct); ImageNet-1k needs 1000 distinct wnids")
    return names


class ImageFolderByWnid(Dataset):
    """``<split>/<wnid>/<image>`` with labels looked up by wnid."""

    def __init__(self, folder: Path, wnids: list[str], transform=None):
        if not folder.is_dir():
            raise FileNotFoundError(f"no ImageNet folder at {folder}; expected {folder}/<wnid>/*.JPEG "
                                    f"(set data.root, or data.imagenet to the folder holding train/ and val/)")
        index = {wnid: i for i, wnid in enumerate(wnids)}
        classes = sorted(p for p in folder.iterdir() if p.is_dir())
        unknown = [p.name for p in classes if p.name not in index]
        if unknown:
            raise ValueError(f"{folder}: class folders {unknown[:5]}{'...' if len(unknown) > 5 else ''} "
                             f"are not ImageNet-1k wnids (see {SYNSETS_FILE})")
        self.samples = [(path, index[c.name]) for c in classes for path in sorted(c.iterdir())
                        if path.suffix.lower() in IMAGE_SUFFIXES]
        if not self.samples:
            raise FileNotFoundError(f"no images under {folder}/<wnid>/ (looked for {', '.join(IMAGE_SUFFIXES)})")
        self.classes = [c.name for c in classes]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        with Image.open(path) as image:
            image = image.convert("RGB")
        return (self.transform(image) if self.transform else image), label


class HFImageNet(Dataset):
    """A Hugging Face dataset with ``image`` and ``label`` columns."""

    def __init__(self, dataset, transform=None):
        missing = {"image", "label"} - set(dataset.column_names)
        if missing:
            raise ValueError(f"the ImageNet dataset lacks the columns {sorted(missing)} (has {dataset.column_names})")
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        row = self.dataset[int(i)]
        image = row["image"].convert("RGB")
        return (self.transform(image) if self.transform else image), int(row["label"])


def hf_split(name_or_path: str, split: str):
    """A split of a local ``save_to_disk`` folder, or of a hub dataset (needs network and access)."""
    import datasets

    path = Path(name_or_path).expanduser()
    if path.exists():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{path} has the splits {list(loaded)}; ImageNet needs {split!r}")
            return loaded[split]
        return loaded
    return datasets.load_dataset(name_or_path, split=split)
