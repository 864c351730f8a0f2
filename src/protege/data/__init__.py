"""Datasets for distillation: one call, :func:`load_data`, gives train/val/test splits and metadata.

>>> from protege.data import load_data
>>> data = load_data("mnist5k")            # 5000 bundled MNIST digits, no download
>>> len(data.train), len(data.val), len(data.test)
(3500, 500, 1000)
>>> data.in_chans, data.input_size, data.num_classes
(1, 28, 10)

Sources (:func:`list_sources`): ``mnist5k`` and ``digits`` (bundled, in-memory, fixed splits),
``fashion-mnist`` (70,000 images read offline from its idx files: ``make data``),
``imagefolder`` (``root/train``, ``root/val``, ``root/test`` class folders),
``torchvision:<Name>`` (CIFAR10, CIFAR100, MNIST, FashionMNIST, KMNIST, QMNIST, SVHN, STL10) and
``hf`` (a HuggingFace dataset saved with ``save_to_disk``). See :mod:`protege.data.sources` for
each source's options and :mod:`protege.data.transforms` for the transform recipes. The in-memory
sources take ``transforms="none"``/``"augment"`` (a random 2-pixel shift), and ``mnist5k``,
``digits`` and ``fashion-mnist`` also ``"strong"`` (random resized crop, a flip for
``fashion-mnist`` only, random erasing: :mod:`protege.data.strong`); all of them replayable for
a teacher-output cache (:mod:`protege.data.views`).
"""

from __future__ import annotations

from .sources import list_sources, load_data
from .splits import DataSplits, TensorImageDataset, TransformSubset, stratified_split
from .transforms import auto_recipe, build_transforms, default_stats, list_recipes
from .wrappers import WithIndex

__all__ = [
    "DataSplits",
    "TensorImageDataset",
    "TransformSubset",
    "WithIndex",
    "auto_recipe",
    "build_transforms",
    "default_stats",
    "list_recipes",
    "list_sources",
    "load_data",
    "stratified_split",
]
