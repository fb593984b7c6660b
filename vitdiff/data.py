"""Datasets: MNIST, Fashion-MNIST and CIFAR-10 through torchvision, and the procedural captioned Shapes.

Images come as float tensors in [0, 1], shaped (C, H, W); diffusion chapters rescale to [-1, 1].
The data root is the environment variable VITDIFF_DATA, else the repository's data/ folder.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

# ----------------------------------------------------------------------------- torchvision datasets

# name -> (torchvision class name, folder under the root, files that must be there, class names)
_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte")
DATASETS = {
    "mnist": ("MNIST", "MNIST/raw", _MNIST_FILES, tuple(str(i) for i in range(10))),
    "fashion_mnist": ("FashionMNIST", "FashionMNIST/raw", _MNIST_FILES,
                      ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                       "Bag", "Ankle boot")),
    "cifar10": ("CIFAR10", "", ("cifar-10-batches-py/data_batch_1",),
                ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")),
}
_ALIASES = {"fashion-mnist": "fashion_mnist", "fashionmnist": "fashion_mnist", "cifar-10": "cifar10"}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not under the data root and could not be downloaded."""


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The folder datasets live in: `root` if given, else $VITDIFF_DATA, else the repository's data/."""
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get("VITDIFF_DATA"):
        return Path(os.environ["VITDIFF_DATA"]).expanduser()
    repo_data = Path(__file__).resolve().parent.parent / "data"
    return repo_data if repo_data.is_dir() else Path.cwd() / "data"


def _copy_hint(key: str, folder: Path) -> str:
    """The README's offline instruction with absolute paths, so it works from any folder (e.g. notebooks/)."""
    share = Path(__file__).resolve().parent.parent.parent / "shared" / "data"  # the README's ../shared/data
    folder = folder.absolute()
    if key == "cifar10":
        return (f"Copy `cifar-10-python.tar.gz` or the unpacked `cifar-10-batches-py/` into {folder}, for example "
                f"from a course share: `cp -r {share}/cifar-10-batches-py {folder}/`")
    return (f"Copy the original files in torchvision's layout (`MNIST/raw/*-ubyte.gz`, "
            f"`FashionMNIST/raw/*-ubyte.gz`) into {folder}, for example from a course share: "
            f"`cp -r {share}/MNIST {share}/FashionMNIST {folder}/`")


def _canonical(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a string, got {type(name).__name__}")
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    return key


def class_names(name: str) -> tuple[str, ...]:
    """Human-readable class names of a dataset, index = label."""
    return DATASETS[_canonical(name)][3]


def _present(folder: Path, files: tuple[str, ...]) -> tuple[bool, bool]:
    """(every file present decompressed, every file present at least as .gz/.tar.gz)."""
    plain = all((folder / f).exists() for f in files)
    packed = all((folder / f).exists() or (folder / (f + ".gz")).exists() for f in files)
    if files and files[0].startswith("cifar-10-batches-py"):
        packed = plain or (folder / "cifar-10-python.tar.gz").exists()
    return plain, packed


def load_dataset(name: str, train: bool = True, root: str | os.PathLike | None = None, transform=None,
                 download: bool = True, timeout: float = 15.0) -> Dataset:
    """A torchvision dataset by name ("mnist", "fashion_mnist", "cifar10"), images as [0, 1] tensors.

    Files already under the root are used offline (.gz archives are checked and unpacked locally).
    If they are missing, torchvision tries to download them (each connection times out after
    `timeout` seconds); when that fails, a DatasetNotFoundError says where to put the files.
    """
    import torchvision
    from torchvision import transforms

    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    key = _canonical(name)
    cls_name, sub, files, _ = DATASETS[key]
    folder = data_root(root)
    plain, packed = _present(folder / sub, files)
    transform = transform if transform is not None else transforms.ToTensor()
    cls = getattr(torchvision.datasets, cls_name)
    if plain:
        return cls(str(folder), train=train, transform=transform, download=False)
    where = (folder / sub if sub else folder).absolute()
    hint = (f"Dataset {key!r} was not found under {where} (data root {folder.absolute()}). "
            f"{_copy_hint(key, folder)}, or point VITDIFF_DATA at a folder that holds them.")
    if not packed and not download:
        raise DatasetNotFoundError(hint)
    # Folders the download creates (data root, MNIST/, MNIST/raw/): removed again if it fails, so a failed
    # offline attempt leaves no empty folder that looks like a dataset.
    created = [p for p in dict.fromkeys([folder, folder / Path(sub).parts[0], folder / sub] if sub else [folder])
               if not p.exists()]
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # never hang on a machine without network
    try:
        # With the archives present torchvision only verifies their checksums and unpacks them.
        return cls(str(folder), train=train, transform=transform, download=True)
    except Exception as error:  # URLError, socket timeout, RuntimeError from a failed check
        for path in created:  # outermost first: everything inside came from this failed attempt
            shutil.rmtree(path, ignore_errors=True)
        raise DatasetNotFoundError(f"{hint} (download failed: {error})") from error
    finally:
        socket.setdefaulttimeout(old_timeout)


def dataset_tensors(name: str, train: bool = True, limit: int | None = None,
                    root: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole dataset as tensors: images (N, C, H, W) float in [0, 1] and labels (N,) int64.

    Much faster than a DataLoader over PIL images for the small models of this book.
    `limit` keeps the first `limit` examples.
    """
    if limit is not None and (not isinstance(limit, int) or limit <= 0):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    ds = load_dataset(name, train=train, root=root)
    images = torch.as_tensor(np.asarray(ds.data))[:limit]
    labels = torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)[:limit]
    images = images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2)  # (N, C, H, W)
    return images.float().div_(255.0), labels


# ----------------------------------------------------------------------------- captioned Shapes

SHAPE_NAMES = ("circle", "square", "triangle")
COLOR_NAMES = ("red", "green", "blue", "yellow")
COLOR_RGB = {"red": (0.9, 0.15, 0.15), "green": (0.15, 0.8, 0.2), "blue": (0.2, 0.35, 0.95),
             "yellow": (0.95, 0.85, 0.1)}
POSITION_NAMES = ("top left", "top right", "bottom left", "bottom right")
ATTRIBUTES = ("shape", "color", "position")
# Shapes render_shapes can also draw but no Shapes caption or data set contains (unless extra_shapes=True): the
# ring (shape index 3) is chapter 10's DreamBooth subject, a shape the text-to-image models have never seen.
EXTRA_SHAPE_NAMES = ("ring",)


def shapes_caption(labels: torch.Tensor | np.ndarray | list) -> str:
    """Caption of attribute rows [(shape, color, position), ...]; rows with -1 are absent objects."""
    parts = []
    for shape, color, position in np.asarray(labels, dtype=np.int64).reshape(-1, 3):
        if shape < 0:
            continue
        name = (SHAPE_NAMES + EXTRA_SHAPE_NAMES)[shape]
        parts.append(f"a {COLOR_NAMES[color]} {name} at the {POSITION_NAMES[position]}")
    if not parts:
        raise ValueError("shapes_caption needs at least one object (a row without -1)")
    return " and ".join(parts)


def shapes_vocabulary() -> list[str]:
    """Every word a Shapes caption can contain, in a fixed order."""
    words = ["a", "at", "the", "and", *SHAPE_NAMES, *COLOR_NAMES]
    for position in POSITION_NAMES:
        words += [w for w in position.split() if w not in words]
    return words


def render_shapes(labels: torch.Tensor | np.ndarray | list, img_size: int = 32,
                  rng: np.random.Generator | None = None) -> torch.Tensor:
    """Draw objects [(shape, color, position), ...] on a black canvas -> (3, img_size, img_size) in [0, 1].

    Each object sits in its quadrant; with `rng` its size and offset are jittered. Edges are
    anti-aliased by 4× supersampling. Shape indices go past SHAPE_NAMES into EXTRA_SHAPE_NAMES (3 = ring).
    """
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 8:
        raise ValueError(f"img_size must be an int >= 8, got {img_size!r}")
    s = 4 * img_size  # supersampled canvas
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    canvas = np.zeros((3, s, s), dtype=np.float32)
    for shape, color, position in np.asarray(labels, dtype=np.int64).reshape(-1, 3):
        if shape < 0:
            continue
        if not (0 <= shape < len(SHAPE_NAMES) + len(EXTRA_SHAPE_NAMES) and 0 <= color < len(COLOR_NAMES)
                and 0 <= position < len(POSITION_NAMES)):
            raise ValueError(f"object (shape={shape}, color={color}, position={position}) is out of range")
        row, col = divmod(int(position), 2)
        half = s / 2
        radius = s * 0.17 * (rng.uniform(0.8, 1.1) if rng is not None else 1.0)
        jitter = (rng.uniform(-0.06, 0.06, size=2) * s) if rng is not None else np.zeros(2)
        cy, cx = (row + 0.5) * half + jitter[0], (col + 0.5) * half + jitter[1]
        dy, dx = yy - cy, xx - cx
        if shape >= len(SHAPE_NAMES):  # the ring: a circle with a hole of 0.55 of its radius
            d2 = dx**2 + dy**2
            inside = (d2 <= radius**2) & (d2 >= (0.55 * radius) ** 2)
        elif SHAPE_NAMES[shape] == "circle":
            inside = dx**2 + dy**2 <= radius**2
        elif SHAPE_NAMES[shape] == "square":
            r = radius * 0.85
            inside = (np.abs(dx) <= r) & (np.abs(dy) <= r)
        else:  # upward triangle: below the two slanted edges, above the base
            r = radius * 1.1
            inside = (dy <= 0.5 * r) & (dy >= -r + 2 * np.abs(dx) * 0.866 * 1.15)
        canvas[:, inside] = np.asarray(COLOR_RGB[COLOR_NAMES[color]], dtype=np.float32)[:, None]
    image = canvas.reshape(3, img_size, 4, img_size, 4).mean(axis=(2, 4))  # box-filter down-sampling
    return torch.from_numpy(np.ascontiguousarray(image))


class Shapes(Dataset):
    """Procedural captioned shapes: item i -> (image (3, H, W) in [0, 1], caption, labels (max_objects, 3)).

    Each image holds 1..max_objects coloured shapes in distinct quadrants, e.g. "a red circle at
    the top left". labels[k] = (shape, color, position) indices of object k, or -1s if absent.
    Item i depends only on (seed, i): the same on every run and machine, with no download.
    extra_shapes=True also draws the EXTRA_SHAPE_NAMES (the ring, index 3), for chapter 10's evaluator.
    """

    def __init__(self, size: int = 10_000, img_size: int = 32, seed: int = 0, max_objects: int = 1,
                 extra_shapes: bool = False):
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if max_objects not in (1, 2):
            raise ValueError(f"max_objects must be 1 or 2, got {max_objects!r}")
        self.size, self.img_size, self.seed, self.max_objects = size, img_size, seed, max_objects
        self.num_shapes = len(SHAPE_NAMES) + (len(EXTRA_SHAPE_NAMES) if extra_shapes else 0)
        render_shapes(np.full((1, 3), -1), img_size)  # validates img_size early

    def __len__(self) -> int:
        return self.size

    def labels(self, index: int) -> torch.Tensor:
        """The attribute rows of item `index`: (max_objects, 3) int64, -1 for absent objects."""
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} out of range for Shapes of size {self.size}")
        index %= self.size
        rng = np.random.default_rng([self.seed, index, 0])
        count = 1 if self.max_objects == 1 else int(rng.integers(1, self.max_objects + 1))
        positions = rng.permutation(len(POSITION_NAMES))[:count]
        rows = np.full((self.max_objects, 3), -1, dtype=np.int64)
        for k, position in enumerate(positions):
            rows[k] = (rng.integers(self.num_shapes), rng.integers(len(COLOR_NAMES)), position)
        return torch.from_numpy(rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, torch.Tensor]:
        labels = self.labels(index)
        rng = np.random.default_rng([self.seed, index % self.size, 1])
        return render_shapes(labels, self.img_size, rng), shapes_caption(labels), labels

    def tensors(self, limit: int | None = None) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """The first `limit` items (all by default) stacked: images (N, 3, H, W), captions, labels (N, K, 3)."""
        if limit is not None and (not isinstance(limit, int) or limit <= 0):
            raise ValueError(f"limit must be a positive int or None, got {limit!r}")
        items = [self[i] for i in range(self.size if limit is None else min(limit, self.size))]
        return torch.stack([x for x, _, _ in items]), [c for _, c, _ in items], torch.stack([y for _, _, y in items])
