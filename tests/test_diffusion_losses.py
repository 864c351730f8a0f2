"""DMD/DMD2 terms: the loss against a hand computation, the fake-score update (changes the fake
model, never the teacher, outside the main optimizer), exact resume of its optimizer state, the NaN
path, the GAN head, and the prediction types the score model supports."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protege.core.distiller import Distiller, Term
from protege.errors import ProtegeError
from protege.losses.diffusion import PrivateAdam, dmd_gradient, dmd_loss
from protege.models.diffusion import OneStepGenerator, ScoreModel, tiny_unet
from protege.tasks import build_task

pytest.importorskip("diffusers")


def _teacher(prediction_type: str = "v_prediction") -> ScoreModel:
    torch.manual_seed(0)
    unet = tiny_unet(8, 3, channels=(8, 16))
    return ScoreModel(unet, {"num_train_timesteps": 50, "prediction_type": prediction_type}, steps=2)


def _generator(teacher: ScoreModel) -> OneStepGenerator:
    gen = OneStepGenerator(tiny_unet(8, 3, channels=(8, 16)), teacher.scheduler)
    gen.unet.load_state_dict(teacher.unet.state_dict())
    return gen


def _batch(n: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "labels": torch.arange(n) % 3,
        "noise": torch.randn(n, 1, 8, 8, generator=g),
        "images": torch.rand(n, 1, 8, 8, generator=g) * 2 - 1,
        "index": torch.arange(n),
    }


def _distiller(terms: list[Term]) -> tuple[Distiller, ScoreModel]:
    teacher = _teacher()
    d = Distiller(_generator(teacher), teacher, terms, task=build_task("generation"))
    d.prepare(_batch())
    return d.train(), teacher


def test_dmd_loss_matches_a_hand_computation() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    real = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    fake = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    loss = dmd_loss(x, real, fake)
    loss.backward()
    xn, rn, fn = x.detach().numpy(), real.numpy(), fake.numpy()
    w = np.abs(xn - rn).mean(axis=(1, 2, 3), keepdims=True)  # DMD2's per-sample weight_factor
    grad = ((xn - rn) - (xn - fn)) / w  # (p_real - p_fake) / w
    np.testing.assert_allclose(loss.item(), 0.5 * np.mean(grad**2), rtol=1e-10)
    np.testing.assert_allclose(x.grad.numpy(), grad / xn.size, rtol=1e-10)  # the gradient is grad / numel


def test_dmd_gradient_zeroes_non_finite_entries() -> None:
    x = torch.ones(2, 1, 2, 2)
    grad = dmd_gradient(x, x.clone(), torch.zeros_like(x))  # weight 0: the division is inf
    assert torch.equal(grad, torch.zeros_like(x))
    with pytest.raises(ValueError, match="one shape"):
        dmd_gradient(x, x[:1], x)


def test_private_adam_is_torch_adamw() -> None:
    torch.manual_seed(0)
    a = torch.nn.Linear(4, 3)
    b = torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    mine = PrivateAdam(list(a.parameters()), lr=1e-2, betas=(0.5, 0.9), weight_decay=0.1)
    ref = torch.optim.AdamW(b.parameters(), lr=1e-2, betas=(0.5, 0.9), weight_decay=0.1)
    for _ in range(5):
        x = torch.randn(8, 4)
        for model in (a, b):
            model.zero_grad()
            model(x).pow(2).mean().backward()
        mine.step()
        ref.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_fake_score_update_changes_the_fake_model_not_the_teacher() -> None:
    d, teacher = _distiller([Term("dmd", ratio=3, lr=1e-3)])
    state = d.terms[0].state
    fake_before = {k: v.clone() for k, v in state.fake.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    main = {id(p) for p in d.parameters() if p.requires_grad}
    assert not main & {id(p) for p in state.fake.parameters()}  # not in the main optimizer
    assert main == {id(p) for p in d.student.parameters()}
    _, losses = d(_batch())
    losses["dmd:images"].backward()
    assert any(not torch.equal(v, state.fake.state_dict()[k]) for k, v in fake_before.items())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())
    assert float(state.optim.step_count) == 3  # ratio updates per generator step
    assert all(p.grad is None for p in state.fake.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.student.parameters())
    d.eval()
    d(_batch())  # no fake update outside training
    assert float(state.optim.step_count) == 3


def test_resume_restores_the_fake_score_and_its_optimizer_exactly() -> None:
    d, _ = _distiller([Term("dmd", ratio=2, lr=1e-3)])
    d(_batch())  # one step: moments are non-zero now
    saved = {k: v.clone() for k, v in d.state_dict().items()}
    assert any(k.endswith("optim.exp_avg_0") for k in saved)
    torch.manual_seed(5)
    d(_batch())
    after = {k: v.clone() for k, v in d.terms[0].state.fake.state_dict().items()}

    fresh, _ = _distiller([Term("dmd", ratio=2, lr=1e-3)])
    fresh.load_state_dict(saved)
    torch.manual_seed(5)
    fresh(_batch())
    for k, v in after.items():
        torch.testing.assert_close(fresh.terms[0].state.fake.state_dict()[k], v, rtol=0, atol=0)


def test_non_finite_fake_update_is_skipped_and_surfaces_as_nan() -> None:
    d, _ = _distiller([Term("dmd", ratio=2, lr=1e-3)])
    state = d.terms[0].state
    before = {k: v.clone() for k, v in state.fake.state_dict().items()}
    batch = _batch()
    batch["noise"][0, 0, 0, 0] = float("nan")  # the generator's sample, hence the fake loss, is NaN
    _, losses = d(batch)
    assert not torch.isfinite(losses["dmd:images"])
    assert "fake-score loss" in state.failure
    assert all(torch.equal(v, state.fake.state_dict()[k]) for k, v in before.items())


def test_gan_head_trains_with_the_fake_score_and_reaches_the_generator() -> None:
    d, _ = _distiller([Term("dmd", ratio=1, lr=1e-3), Term("dmd_gan", 0.1, critic_weight=1.0)])
    head = d.terms[1].state
    before = {k: v.clone() for k, v in head.net.state_dict().items()}
    _, losses = d(_batch())
    assert any(not torch.equal(v, head.net.state_dict()[k]) for k, v in before.items())
    d.student.zero_grad()
    losses["dmd_gan:images"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.student.parameters())
    assert all(p.grad is None for p in head.net.parameters())
    no_real = _batch()
    del no_real["images"]
    with pytest.raises(ProtegeError, match="real images"):
        d(no_real)


def test_gan_term_needs_a_dmd_term_before_it() -> None:
    teacher = _teacher()
    terms = [Term("dmd_gan"), Term("dmd")]
    d = Distiller(_generator(teacher), teacher, terms, task=build_task("generation"))
    with pytest.raises(ProtegeError, match="list a dmd term before it"):
        d.prepare(_batch())


def test_dmd_needs_a_diffusion_teacher() -> None:
    teacher = torch.nn.Linear(2, 2)
    gen = _generator(_teacher())
    d = Distiller(gen, teacher, [Term("dmd")], task=build_task("generation"))
    with pytest.raises(ProtegeError, match="not a score model"):
        d.prepare(_batch())


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_supported_prediction_types_invert_their_own_targets(kind: str) -> None:
    model = _teacher(kind)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 10, 30, 49])
    x_t = model.add_noise(x0, noise, t)
    a = model.schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * noise)
    target = model.schedule.target(x0, noise, t)
    torch.testing.assert_close(model.schedule.x0_from(target, x_t, t), x0, rtol=1e-4, atol=1e-4)


def test_unsupported_prediction_type_is_refused() -> None:
    with pytest.raises(ProtegeError, match="supports prediction types epsilon, v_prediction, sample"):
        _teacher("flow_prediction")
    from diffusers import FlowMatchEulerDiscreteScheduler

    with pytest.raises(ProtegeError, match="epsilon, v_prediction, sample|alphas_cumprod"):
        ScoreModel(tiny_unet(8, 3, channels=(8, 16)), FlowMatchEulerDiscreteScheduler())


def test_denoising_and_regression_terms_are_mse() -> None:
    from protege.losses import get_loss

    a, b = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    for name in ("denoising", "dmd_regression"):
        torch.testing.assert_close(get_loss(name).fn([a, b]), ((a - b) ** 2).mean())


def test_score_matching_is_mse_to_the_teacher_at_the_students_own_noised_inputs() -> None:
    """Teacher Score Matching (MSD): the loss equals an independent MSE between the student's output
    and the teacher's at the very x_t and t the student was asked, and only the student gets gradient."""
    teacher = _teacher()
    torch.manual_seed(3)
    student = ScoreModel(tiny_unet(8, 3, channels=(8, 8)), teacher.scheduler, steps=2)
    d = Distiller(
        student, teacher, [Term("score_matching", name="tsm")], task=build_task("generation")
    ).train()
    d.prepare(_batch())  # in training mode: a score model's training outputs are what the term reads
    torch.manual_seed(7)
    _, losses = d(_batch())
    torch.manual_seed(7)  # the same draw of t and noise, by hand
    batch = _batch()
    x_t, t, _ = student.noised(batch["images"])
    with torch.no_grad():
        expected = (
            (student.predict(x_t, t, batch["labels"]) - teacher.predict(x_t, t, batch["labels"])) ** 2
        ).mean()
    torch.testing.assert_close(losses["tsm"], expected)
    losses["tsm"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
