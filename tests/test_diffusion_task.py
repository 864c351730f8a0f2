"""Multi-student routing: the class partition, the routed generator, the cohort's per-student batches,
and the sample grid writer."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from protege.errors import ProtegeError
from protege.models.diffusion import RoutedGenerator, partition_classes

pytest.importorskip("diffusers")


class Constant(nn.Module):
    """A stand-in generator: every image is filled with ``value``; it records the labels it drew."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.tensor(float(value)))
        self.seen: list[int] = []

    def forward(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.seen += labels.tolist()
        return torch.zeros_like(noise) + self.value


def test_contiguous_partition() -> None:
    assert partition_classes(10, ["a", "b", "c", "d"]) == {
        "a": [0, 1, 2],
        "b": [3, 4, 5],
        "c": [6, 7],
        "d": [8, 9],
    }
    assert partition_classes(10, ["only"]) == {"only": list(range(10))}


@pytest.mark.parametrize(
    ("students", "mapping", "message"),
    [
        (list("abcdefghijk"), None, "11 students but only 10 classes"),
        (["a", "b"], {"a": [0, 1, 2, 3, 4], "b": [5, 6, 7, 8]}, r"no student covers class\(es\) \[9\]"),
        (["a", "b"], {"a": [0, 1, 2, 3, 4, 5], "b": [5, 6, 7, 8, 9]}, "given to two students"),
        (["a", "b"], {"a": list(range(10)), "c": []}, "names students"),
        (["a", "b"], {"a": list(range(10)), "b": []}, "cover no class"),
        (["a"], {"a": [*range(10), 12]}, "not in"),
    ],
)
def test_bad_partitions(students: list[str], mapping: dict | None, message: str) -> None:
    with pytest.raises(ProtegeError, match=message):
        partition_classes(10, students, mapping)


def test_routed_generator_sends_each_class_to_its_student() -> None:
    gens = {"a": Constant(1.0), "b": Constant(2.0)}
    routed = RoutedGenerator(gens, {"a": [0, 2], "b": [1]})
    labels = torch.tensor([2, 1, 0, 1])
    out = routed(torch.zeros(4, 1, 2, 2), labels)
    assert out[:, 0, 0, 0].tolist() == [1.0, 2.0, 1.0, 2.0]
    assert sorted(gens["a"].seen) == [0, 2] and gens["b"].seen == [1, 1]
    with pytest.raises(
        ProtegeError, match=r"no student covers class\(es\) \[3\]; the students cover \[0, 1, 2\]"
    ):
        routed(torch.zeros(1, 1, 2, 2), torch.tensor([3]))


def test_cohort_trains_each_student_on_its_own_classes() -> None:
    from protege.core.cohort import Cohort
    from protege.core.distiller import Term
    from protege.tasks import build_task
    from protege.tasks.diffusion import GenerationDataSplits

    task = build_task("generation")
    data = GenerationDataSplits(
        train=None, val=None, test=None, num_classes=4, in_chans=1, input_size=2, class_names=[], source="x"
    )
    task.bind(data)
    gens = {"a": Constant(1.0), "b": Constant(2.0)}
    cohort = Cohort(gens, None, [Term("dmd_regression", student=["images", "real_images"])], task=task)
    assert cohort.parts == {"a": [0, 1], "b": [2, 3]}
    batch = {
        "labels": torch.tensor([3, 0, 2, 3]),
        "noise": torch.zeros(4, 1, 2, 2),
        "images": torch.zeros(4, 1, 2, 2),
    }
    _, losses = cohort.train()(batch)
    assert gens["a"].seen == [0] and gens["b"].seen == [3, 2, 3]
    assert losses["a/dmd_regression:images,real_images"].item() == pytest.approx(1.0)
    assert losses["b/dmd_regression:images,real_images"].item() == pytest.approx(4.0)
    only_b = {k: v[[0]] for k, v in batch.items()}  # a has no sample: its losses are 0 this step
    _, losses = cohort(only_b)
    assert losses["a/dmd_regression:images,real_images"].item() == 0.0
    routed = cohort.inference_models()[""]
    assert isinstance(routed, RoutedGenerator)


def test_sample_grid_png(tmp_path) -> None:
    from PIL import Image

    from protege.sample import sample_images, save_grid

    images = sample_images(Constant(0.5), 3, 5, (1, 4, 4), seed=0)
    assert images.shape == (5, 1, 4, 4) and torch.all(images == 0.5)
    path = save_grid(images, tmp_path / "g.png")
    with Image.open(io.BytesIO(path.read_bytes())) as img:  # 3 columns, 2 rows, 1-px padding, 4x scale
        assert img.size == ((3 * 5 + 1) * 4, (2 * 5 + 1) * 4)
        assert img.getpixel((6, 6)) == round(0.75 * 255)  # a pixel of the first image: (0.5 + 1) / 2


def test_ode_pairs_feed_the_regression_term() -> None:
    from protege.core.distiller import Distiller, Term
    from protege.models.diffusion import OneStepGenerator, ScoreModel, tiny_unet
    from protege.tasks import build_task
    from protege.tasks.diffusion import ConditionedImages, make_ode_pairs

    torch.manual_seed(0)
    teacher = ScoreModel(
        tiny_unet(8, 3, channels=(8, 16)), {"num_train_timesteps": 20}, "DDIMScheduler", steps=2
    )
    pairs = make_ode_pairs(teacher, 3, 6, seed=1)
    assert pairs["labels"].tolist() == [0, 1, 2, 0, 1, 2]
    torch.testing.assert_close(pairs["images"], teacher.sample(pairs["noise"], pairs["labels"], 2))
    data = ConditionedImages(torch.zeros(4, 1, 8, 8), torch.tensor([2, 0, 1, 2]), train=True, pairs=pairs)
    item = data[0]
    row = [i for i in range(6) if torch.equal(pairs["noise"][i], item["pair_noise"])]
    assert row and int(pairs["labels"][row[0]]) == 2  # a pair of the item's own class
    gen = OneStepGenerator(tiny_unet(8, 3, channels=(8, 16)), teacher.scheduler)
    d = Distiller(gen, None, [Term("dmd_regression", name="regression")], task=build_task("generation"))
    batch = torch.utils.data.default_collate([data[i] for i in range(4)])
    out, losses = d.train()(batch)
    torch.testing.assert_close(
        losses["regression"], ((out["pair_images"] - batch["pair_images"]) ** 2).mean()
    )
    with pytest.raises(ProtegeError, match="no pair of class 3"):
        ConditionedImages(torch.zeros(1, 1, 8, 8), torch.tensor([3]), train=True, pairs=pairs)
