"""Tests of vitdiff.data: the captioned Shapes dataset, dataset lookup and the offline error path, MNIST tensors."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from vitdiff.data import (
    COLOR_NAMES,
    COLOR_RGB,
    EXTRA_SHAPE_NAMES,
    POSITION_NAMES,
    SHAPE_NAMES,
    DatasetNotFoundError,
    Shapes,
    class_names,
    dataset_tensors,
    load_dataset,
    render_shapes,
    shapes_caption,
    shapes_vocabulary,
)

# ----------------------------------------------------------------------------- Shapes


def parse_caption(caption: str) -> list[tuple[int, int, int]]:
    """Turn "a red circle at the top left and ..." back into (shape, color, position) index rows."""
    rows = []
    for part in caption.split(" and "):
        words = part.split()
        assert words[0] == "a" and words[3:5] == ["at", "the"], caption
        rows.append((SHAPE_NAMES.index(words[2]), COLOR_NAMES.index(words[1]),
                     POSITION_NAMES.index(" ".join(words[5:]))))
    return rows


def quadrant(image: torch.Tensor, position: int) -> torch.Tensor:
    """The (3, H/2, W/2) quarter of an image at a position index (0 top left ... 3 bottom right)."""
    row, col = divmod(position, 2)
    h, w = image.shape[-2] // 2, image.shape[-1] // 2
    return image[:, row * h:(row + 1) * h, col * w:(col + 1) * w]


def test_item_types_and_range():
    image, caption, labels = Shapes(size=5, img_size=24)[0]
    assert image.shape == (3, 24, 24) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.max() > 0.5
    assert isinstance(caption, str)
    assert labels.shape == (1, 3) and labels.dtype == torch.int64


def test_shapes_is_deterministic():
    a, b, c = Shapes(size=20, seed=7), Shapes(size=20, seed=7), Shapes(size=20, seed=8)
    for i in (0, 5, 19):
        first, again, twin = a[i], a[i], b[i]
        for x, y in ((first, again), (first, twin)):
            assert torch.equal(x[0], y[0]) and x[1] == y[1] and torch.equal(x[2], y[2])
    assert any(not torch.equal(a[i][0], c[i][0]) for i in range(20))
    assert [a[i][1] for i in range(20)] != [c[i][1] for i in range(20)]
    assert torch.equal(a[-1][0], a[19][0])


@pytest.mark.parametrize("max_objects", [1, 2])
def test_caption_matches_labels_and_pixels(max_objects):
    data = Shapes(size=40, img_size=32, seed=1, max_objects=max_objects)
    for i in range(len(data)):
        image, caption, labels = data[i]
        present = [tuple(row) for row in labels.tolist() if row[0] >= 0]
        assert parse_caption(caption) == present
        named = set()
        for _, color, position in present:
            mean = quadrant(image, position).mean(dim=(1, 2))  # (3,)
            rgb = torch.tensor(COLOR_RGB[COLOR_NAMES[color]])
            # the quadrant is the colour blended with black: its mean is proportional to the colour
            coverage = mean.sum() / rgb.sum()
            assert coverage > 0.05, (i, caption)
            torch.testing.assert_close(mean / coverage, rgb, atol=1e-4, rtol=1e-4)
            named.add(position)
        for position in set(range(4)) - named:
            assert quadrant(image, position).max() == 0, (i, caption, POSITION_NAMES[position])


def test_two_objects_sit_in_distinct_quadrants():
    data = Shapes(size=60, seed=2, max_objects=2)
    counts = set()
    for i in range(len(data)):
        labels = data.labels(i)
        assert labels.shape == (2, 3)
        present = labels[labels[:, 0] >= 0]
        assert (labels[labels[:, 0] < 0] == -1).all()
        counts.add(len(present))
        assert len(set(present[:, 2].tolist())) == len(present)
    assert counts == {1, 2}


def test_tensors_stacks_items():
    data = Shapes(size=10, img_size=16, max_objects=2)
    images, captions, labels = data.tensors(limit=4)
    assert images.shape == (4, 3, 16, 16) and labels.shape == (4, 2, 3) and len(captions) == 4
    assert torch.equal(images[3], data[3][0]) and captions[3] == data[3][1]
    assert data.tensors()[0].shape[0] == 10


def test_tensors_rejects_zero_limit():
    with pytest.raises(ValueError, match="limit"):
        Shapes(size=10).tensors(limit=0)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(size=0), ValueError, "size"),
    (dict(size=-3), ValueError, "size"),
    (dict(size=2.5), ValueError, "size"),
    (dict(max_objects=0), ValueError, "max_objects"),
    (dict(max_objects=3), ValueError, "max_objects"),
    (dict(img_size=7), ValueError, "img_size"),
])
def test_shapes_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        Shapes(**kwargs)


@pytest.mark.parametrize("index", [10, 11, -11])
def test_shapes_index_out_of_range(index):
    data = Shapes(size=10)
    with pytest.raises(IndexError, match=str(index)):
        data[index]


def test_render_and_caption_errors():
    with pytest.raises(ValueError, match="img_size"):
        render_shapes([[0, 0, 0]], img_size=4)
    with pytest.raises(ValueError, match="out of range"):
        render_shapes([[0, len(COLOR_NAMES), 0]])
    with pytest.raises(ValueError, match="at least one"):
        shapes_caption([[-1, -1, -1]])
    assert shapes_caption([[1, 2, 3], [-1, -1, -1]]) == "a blue square at the bottom right"


def test_vocabulary_covers_every_caption_word():
    vocabulary = shapes_vocabulary()
    assert len(vocabulary) == len(set(vocabulary))
    data = Shapes(size=100, img_size=8, max_objects=2)
    words = {w for i in range(len(data)) for w in shapes_caption(data.labels(i)).split()}
    assert words <= set(vocabulary)
    assert set(SHAPE_NAMES) | set(COLOR_NAMES) <= set(vocabulary)


# ----------------------------------------------------------------------------- torchvision datasets


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="'imagenet_tiny'"):
        load_dataset("imagenet_tiny")
    with pytest.raises(ValueError, match="'svhn'"):
        class_names("svhn")
    assert class_names("Fashion-MNIST")[9] == "Ankle boot" and len(class_names("mnist")) == 10


def test_missing_dataset_without_download(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="not found") as info:
        load_dataset("mnist", root=tmp_path, download=False)
    assert str(tmp_path / "MNIST" / "raw") in str(info.value)
    assert "VITDIFF_DATA" in str(info.value)


def _no_network(monkeypatch, calls):
    def no_network(*args, **kwargs):
        calls.append(args)
        raise urllib.error.URLError("network disabled in tests")

    def no_socket(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_socket)
    monkeypatch.setattr(socket, "create_connection", no_socket)
    monkeypatch.setattr(socket.socket, "connect", no_socket)


@pytest.mark.parametrize("name, folder", [("fashion_mnist", "FashionMNIST"), ("mnist", "MNIST")])
def test_failed_download_leaves_no_empty_dataset_folder(tmp_path, monkeypatch, name, folder):
    _no_network(monkeypatch, [])
    root = tmp_path / "fresh_root"  # not there yet: created by the download attempt, so removed again
    with pytest.raises(DatasetNotFoundError):
        load_dataset(name, root=root, download=True, timeout=1.0)
    assert not root.exists()
    (tmp_path / "keep.txt").write_text("the user's")
    with pytest.raises(DatasetNotFoundError):
        load_dataset(name, root=tmp_path, download=True, timeout=1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]  # no empty FashionMNIST/raw left behind
    (tmp_path / folder / "raw").mkdir(parents=True)
    (tmp_path / folder / "raw" / "notes.txt").write_text("the user's")
    with pytest.raises(DatasetNotFoundError):
        load_dataset(name, root=tmp_path, download=True, timeout=1.0)
    assert (tmp_path / folder / "raw" / "notes.txt").exists()  # folders that were there before are kept


def test_missing_dataset_hint_is_the_readme_command_with_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # as from a notebook's own folder; a relative root must show up absolute
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion_mnist", root="data", download=False)
    message = str(info.value)
    share = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
    command = f"cp -r {share}/MNIST {share}/FashionMNIST {tmp_path / 'data'}/"
    assert f"`{command}`" in message and str(tmp_path / "data" / "FashionMNIST" / "raw") in message
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "cp -r ../shared/data/MNIST ../shared/data/FashionMNIST data/" in readme  # same command, relative
    assert "torchvision's layout (`MNIST/raw/*-ubyte.gz`, `FashionMNIST/raw/*-ubyte.gz`)" in message


def test_missing_dataset_with_failing_download(tmp_path, monkeypatch):
    calls = []

    def no_network(*args, **kwargs):
        calls.append(args)
        raise urllib.error.URLError("network disabled in tests")

    def no_socket(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_socket)
    monkeypatch.setattr(socket, "create_connection", no_socket)
    monkeypatch.setattr(socket.socket, "connect", no_socket)
    before = socket.getdefaulttimeout()
    with pytest.raises(DatasetNotFoundError, match="download failed") as info:
        load_dataset("fashion_mnist", root=tmp_path, download=True, timeout=1.0)
    assert str(tmp_path / "FashionMNIST" / "raw") in str(info.value)
    assert calls, "the download was expected to go through urllib.request.urlopen"
    assert socket.getdefaulttimeout() == before  # the temporary socket timeout is restored


def test_dataset_tensors_mnist_test_split(mnist_root):
    images, labels = dataset_tensors("mnist", train=False, limit=32, root=mnist_root)
    assert images.shape == (32, 1, 28, 28) and images.dtype == torch.float32
    assert images.min() >= 0.0 and images.max() <= 1.0 and images.max() > 0.9
    assert labels.shape == (32,) and labels.dtype == torch.int64
    assert 0 <= labels.min() and labels.max() <= 9 and len(labels.unique()) > 5
    dataset = load_dataset("mnist", train=False, root=mnist_root)
    image, label = dataset[5]
    torch.testing.assert_close(images[5], image)
    assert labels[5].item() == label


@pytest.mark.parametrize("limit", [0, -1, 2.5])
def test_dataset_tensors_rejects_bad_limit(limit):
    with pytest.raises(ValueError, match="limit"):
        dataset_tensors("mnist", limit=limit)


def test_the_ring_is_drawn_but_never_in_shapes_unless_asked():
    ring = render_shapes([[len(SHAPE_NAMES), 0, 0]])  # EXTRA_SHAPE_NAMES[0]
    circle = render_shapes([[SHAPE_NAMES.index("circle"), 0, 0]])
    centre = (slice(None), slice(6, 10), slice(6, 10))  # the middle of the top-left quadrant
    assert circle[centre].sum() > 0 and ring[centre].sum() == 0  # the ring has a hole where the circle is filled
    assert 0.2 < ring.sum() / circle.sum() < 0.8
    assert shapes_caption([[len(SHAPE_NAMES), 1, 3]]) == "a green ring at the bottom right"
    with pytest.raises(ValueError, match="out of range"):
        render_shapes([[len(SHAPE_NAMES) + len(EXTRA_SHAPE_NAMES), 0, 0]])
    plain = Shapes(size=200, seed=3).tensors()[2][:, 0, 0]
    extra = Shapes(size=200, seed=3, extra_shapes=True).tensors()[2][:, 0, 0]
    assert int(plain.max()) == len(SHAPE_NAMES) - 1 and int(extra.max()) == len(SHAPE_NAMES)
