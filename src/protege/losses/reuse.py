"""SimKD: knowledge distillation with the reused teacher classifier (Chen et al., CVPR 2022).

The student's last feature map is projected into the teacher's feature space and trained to match
the teacher's feature (an MSE, the only loss of the method); at inference the student classifies
with the *teacher's* classifier, applied to the projected, pooled feature. The student's own head
is never used. A run YAML::

    {loss: simkd, weight: 1.0, student: layer3, teacher: layer3, head: fc}

The term's state, :class:`SimKDProjector`, holds the projector (trained with the student) and a
frozen copy of the teacher's head (saved in checkpoints, so the trained model can be evaluated and
exported without the teacher). :meth:`SimKDProjector.inference` wraps the student into the model
that predicts (:class:`SimKDStudent`); :meth:`protege.Distiller.inference_model` and ``export`` use
it.

KD³'s feature and classifier alignment (:func:`kd3_align`, state :class:`KD3Aligner`) is SimKD
with a per-sample weight from the teacher-student prediction gap; it predicts the same way.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ProtegeError, closest
from .contrastive import KD3_PAPER
from .features import check_features
from .registry import BuildContext, register_loss

__all__ = [
    "KD3Aligner",
    "SimKDProjector",
    "SimKDStudent",
    "align_spatial",
    "kd3_align",
    "simkd",
    "simkd_projector",
]

INPUT_SUFFIX = ":in"  # a tap on a module's input, as in protege.core.taps


def _as_map(x: Tensor) -> Tensor:
    return x[:, :, None, None] if x.dim() == 2 else x


def _check_pair(student: Any, teacher: Any) -> None:
    if not isinstance(student, Tensor) or not isinstance(teacher, Tensor):
        raise ValueError(
            "simkd reads one student tap and one teacher tap (the last feature maps), got "
            f"{type(student).__name__} and {type(teacher).__name__}"
        )
    check_features(student, teacher, "simkd", ranks=(4, 2), same_rank=False)


def align_spatial(student: Tensor, teacher_size: tuple[int, int]) -> Tensor:
    """Average-pool a student map down to the teacher's size along each axis where it is larger."""
    size = (min(student.shape[-2], teacher_size[0]), min(student.shape[-1], teacher_size[1]))
    return student if tuple(student.shape[-2:]) == size else F.adaptive_avg_pool2d(student, size)


def simkd_projector(in_channels: int, out_channels: int, factor: int = 2) -> nn.Sequential:
    """SimKD's projector: 1x1 conv to ``C_t / r``, 3x3 conv, 1x1 conv to ``C_t``; each with BN + ReLU.

    The bottleneck of the paper (Fig. 2) and the official code, ``r = factor``; convolutions have no
    bias (BN follows each).
    """
    return _projector(in_channels, max(out_channels // factor, 1), out_channels)


def _projector(in_channels: int, mid: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, mid, kernel_size=1, bias=False),
        nn.BatchNorm2d(mid),
        nn.ReLU(),
        nn.Conv2d(mid, mid, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(mid),
        nn.ReLU(),
        nn.Conv2d(mid, out_channels, kernel_size=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


def _first_tensor(value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            if isinstance(item, Tensor):
                return item
    raise ProtegeError(f"simkd: the tapped module returned {type(value).__name__}, which holds no tensor")


def _resolve(model: nn.Module, path: str, what: str) -> nn.Module:
    name = path.removesuffix(INPUT_SUFFIX)
    try:
        return model.get_submodule(name)
    except AttributeError:
        near = closest(name, [n for n, _ in model.named_modules() if n], n=6)
        top = ", ".join(n for n, _ in model.named_children())
        raise ValueError(
            f"simkd: no module {name!r} in the {what} {type(model).__name__}; its top-level modules: {top}"
            + (f"; closest paths: {', '.join(near)}" if near else "")
        ) from None


class SimKDProjector(nn.Module):
    r"""SimKD's state: the projector, a frozen copy of the teacher's classifier, and inference.

    Args:
        head: module path of the teacher's classifier (``"fc"`` in the CIFAR zoo and torchvision
            ResNets, ``"classifier"`` for VGG/MobileNetV2, ``"head"`` or ``"head.fc"`` in timm).
            Its input must be the teacher's pooled feature, i.e. the term's teacher tap must be the
            feature map that the teacher pools and classifies (or that pooled feature, ``"fc:in"``).
        factor: bottleneck reduction ``r`` of the projector (``C_t / r`` middle channels; 2 in the
            paper).
        tap: the student tap the term reads, needed to rebuild the prediction path at inference.
            Taken from the term itself when the build context names it; set it otherwise (the same
            path as the term's ``student``).

    :meth:`build` (run by :meth:`protege.Distiller.prepare`) sizes the projector from one batch's
    features and deep-copies the teacher's head; the copy's parameters have ``requires_grad``
    False and it stays in ``eval()``, so no optimizer or BN update touches it, yet it is part of the
    state dict and of checkpoints. Loading a state dict into an unbuilt ``SimKDProjector`` rebuilds it
    when the head is an ``nn.Linear`` (the usual case): the trained model can then be restored
    without the teacher.
    """

    def __init__(self, head: str = "fc", factor: int = 2, tap: str | None = None) -> None:
        super().__init__()
        if int(factor) != factor or factor < 1:
            raise ValueError(f"SimKDProjector: factor must be a positive integer, got {factor}")
        self.head_path = head
        self.factor = int(factor)
        self.tap = tap
        self.projector: nn.Module | None = None
        self.head: nn.Module | None = None
        # the teacher feature's spatial size: the student map is pooled down to it at inference too
        self.register_buffer("teacher_size", torch.zeros(2, dtype=torch.long))
        self._size: tuple[int, int] | None = None  # the buffer as ints: no device sync per forward
        self.pending = True

    # -- building --------------------------------------------------------------------------------
    def build(self, student: Any, teacher: Any, context: BuildContext) -> None:
        """Size the projector from the features, copy the teacher's head (frozen), learn the tap."""
        _check_pair(student, teacher)
        self._learn_tap(context)
        teachers = list(getattr(context, "teachers", []) or [])
        index = getattr(context, "teacher_index", None) or 0
        if not teachers:
            raise ValueError(
                "simkd reuses the teacher's classifier, but the distiller has no teacher model (cached "
                "teacher outputs carry no classifier): give the teacher model"
            )
        if not 0 <= index < len(teachers):
            raise ValueError(f"simkd: teacher index {index} is out of range for {len(teachers)} teacher(s)")
        source = teachers[index]
        head = _resolve(source, self.head_path, "teacher")
        s, t = _as_map(student), _as_map(teacher)
        channels = t.shape[1]
        self._check_head(head, channels, t)
        self.projector = simkd_projector(s.shape[1], channels, self.factor)
        self.head = self._frozen_copy(head)
        self._size = (t.shape[-2], t.shape[-1])
        self.teacher_size = torch.tensor(self._size, dtype=torch.long, device=self.teacher_size.device)
        self.pending = False

    def bind_term(self, student_key: str | list[str], teacher_key: str | list[str]) -> None:
        """Called by the term at construction: learn the student tap (unless ``tap`` was set)."""
        if isinstance(student_key, str):
            if self.tap is not None and self.tap != student_key:
                raise ProtegeError(
                    f"simkd: tap={self.tap!r} differs from the term's student tap {student_key!r}; drop tap"
                )
            self.tap = student_key

    def _learn_tap(self, context: Any) -> None:
        key = getattr(context, "student_key", None)
        if key is not None and not isinstance(key, str):
            raise ValueError(f"simkd reads one student tap, got the list {list(key)}")
        if key is not None and self.tap is not None and key != self.tap:
            raise ValueError(f"simkd: tap={self.tap!r} differs from the term's student tap {key!r}; drop tap")
        self.tap = self.tap or key
        if self.tap is None:
            raise ValueError(
                "simkd needs the student tap path to predict at inference: set the state parameter "
                "tap (the same path as the term's student, e.g. tap: layer3)"
            )

    def _check_head(self, head: nn.Module, channels: int, teacher: Tensor) -> None:
        probe = torch.zeros(1, channels, dtype=teacher.dtype, device=teacher.device)
        was_training = head.training
        head.eval()
        try:
            with torch.no_grad():
                head(probe)
        except (RuntimeError, ValueError) as e:
            raise ValueError(
                f"simkd: the teacher's head {self.head_path!r} does not take the pooled teacher feature "
                f"(C_t={channels} channels, from the teacher tap of shape {tuple(teacher.shape)}): {e}. "
                "Tap the map that the teacher pools and classifies, or the head's input ('fc:in')"
            ) from e
        finally:
            head.train(was_training)

    @staticmethod
    def _frozen_copy(head: nn.Module) -> nn.Module:
        frozen = copy.deepcopy(head)
        for p in frozen.parameters():
            p.requires_grad_(False)
        return frozen.eval()

    def _load_from_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # A trained SimKD restored without its teacher: rebuild the modules from the saved shapes.
        weight = state_dict.get(prefix + "head.weight")
        first = state_dict.get(prefix + "projector.0.weight")
        last = state_dict.get(prefix + "projector.6.weight")
        if (
            self.pending
            and first is not None
            and last is not None
            and weight is not None
            and weight.dim() == 2
        ):
            self.projector = _projector(first.shape[1], first.shape[0], last.shape[0])
            head = nn.Linear(weight.shape[1], weight.shape[0], bias=prefix + "head.bias" in state_dict)
            self.head = self._frozen_copy(head)
            self.pending = False
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "teacher_size" in state_dict:
            height, width = (int(v) for v in self.teacher_size.tolist())
            self._size = (height, width)

    # -- training and inference ------------------------------------------------------------------
    def train(self, mode: bool = True) -> SimKDProjector:
        super().train(mode)
        if self.head is not None:  # the reused classifier is frozen: no dropout, no BN updates
            self.head.eval()
        return self

    def forward(self, progress: float = 0.0) -> dict[str, Callable[[Tensor], Tensor]]:
        if self.projector is None:
            raise ValueError("simkd: the projector is not built yet; call distiller.prepare(batch)")
        return {"projector": self.projector}

    def predict(self, feature: Tensor) -> Tensor:
        """Logits from a student feature: ``head(avgpool(projector(pool(feature))))``."""
        if self.projector is None or self.head is None:
            raise ProtegeError(
                "simkd: the projector and reused head are not built yet; call distiller.prepare(batch) "
                "(protege.fit does) or load a trained state dict"
            )
        x = _as_map(feature)
        if self._size is not None:
            x = align_spatial(x, self._size)
        x = self.projector(x)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def inference(self, student: nn.Module) -> SimKDStudent:
        """The model that predicts: the student up to its tap, the projector, the teacher's head."""
        if self.tap is None:
            raise ProtegeError("simkd: the student tap is unknown; set the state parameter tap")
        _resolve(student, self.tap, "student")
        return SimKDStudent(student, self.tap, self)

    def extra_repr(self) -> str:
        if self.pending:
            return f"head={self.head_path!r}, factor={self.factor}, pending: built on distiller.prepare"
        return f"head={self.head_path!r} (frozen copy), factor={self.factor}, tap={self.tap!r}"


class SimKDStudent(nn.Module):
    """The student as SimKD deploys it: ``forward(x)`` runs the student, takes the tapped feature,
    and returns ``state.predict(feature)`` (projector, pooling, the teacher's frozen classifier).

    The feature is read by a forward hook held only during the call, so the wrapped student is left
    unchanged. Parameters and buffers: ``student.*`` and ``state.*`` (projector and head).
    """

    def __init__(self, student: nn.Module, tap: str, state: SimKDProjector) -> None:
        super().__init__()
        self.student = student
        self.tap = tap
        self.state = state
        self.train(student.training)

    def features(self, x: Any) -> Tensor:
        """The student's tapped feature for input ``x``."""
        module = _resolve(self.student, self.tap, "student")
        seen: list[Tensor] = []
        if self.tap.endswith(INPUT_SUFFIX):
            handle = module.register_forward_pre_hook(lambda _m, args: seen.append(_first_tensor(args)))
        else:
            handle = module.register_forward_hook(lambda _m, _a, out: seen.append(_first_tensor(out)))
        try:
            self.student(x)
        finally:
            handle.remove()
        if not seen:
            raise ProtegeError(f"simkd: the student never ran its tapped module {self.tap!r}")
        return seen[-1]

    def forward(self, x: Any) -> Tensor:
        return self.state.predict(self.features(x))


@register_loss(
    "simkd",
    paper="Chen, Mei, Wang, Feng & Chen, Knowledge Distillation with the Reused Teacher Classifier, CVPR 2022",
    reads="features",
    state=SimKDProjector,
)
def simkd(
    student_features: Tensor, teacher_features: Tensor, *, projector: Callable[[Tensor], Tensor]
) -> Tensor:
    r"""SimKD: MSE between the projected student feature and the teacher's, at a common spatial size.

    Chen, Mei, Wang, Feng & Chen, "Knowledge Distillation with the Reused Teacher Classifier",
    CVPR 2022. With ``f_s`` the student's and ``f_t`` the teacher's last feature map (before
    pooling) and ``P`` the projector (:func:`simkd_projector`):

        L = mean over all elements of (P(pool(f_s)) - pool(f_t))^2

    where ``pool`` average-pools whichever map is larger down to the smaller size (per axis), as
    in the official code (which compares the two maps *before* global pooling; the paper writes
    ``||f_t - P(f_s)||_2^2``). The published recipe trains with this loss alone (weight 1, no
    cross-entropy, no KD). At inference the prediction is ``h_t(avgpool(P(pool(f_s))))`` with the
    teacher's frozen classifier ``h_t`` (see :class:`SimKDProjector`).

    ``projector`` is supplied by the term's state. Shapes: (N, C_s, H_s, W_s) and (N, C_t, H_t,
    W_t), or vectors (N, D) treated as (N, D, 1, 1); the projector must output C_t channels.
    """
    projected, t = _projected_pair(student_features, teacher_features, projector, "simkd")
    return F.mse_loss(projected, t)


def _projected_pair(
    student_features: Tensor, teacher_features: Tensor, projector: Callable[[Tensor], Tensor], loss: str
) -> tuple[Tensor, Tensor]:
    """``(P(pool(f_s)), pool(f_t))`` at a common spatial size, checked to have the same shape."""
    _check_pair(student_features, teacher_features)
    s, t = _as_map(student_features), _as_map(teacher_features)
    s = align_spatial(s, (t.shape[-2], t.shape[-1]))
    t = align_spatial(t, (s.shape[-2], s.shape[-1]))
    projected = projector(s)
    if projected.shape != t.shape:
        raise ValueError(
            f"{loss}: the projected student feature {tuple(projected.shape)} does not match the teacher "
            f"feature {tuple(t.shape)} (from student {tuple(student_features.shape)})"
        )
    return projected, t


class KD3Aligner(SimKDProjector):
    """:func:`kd3_align`'s state: SimKD's projector and frozen copy of the teacher's classifier
    (see :class:`SimKDProjector`: same arguments, building, checkpointing and inference), with the
    classifier also handed to the loss, which weighs each sample by the prediction gap."""

    def forward(self, progress: float = 0.0) -> dict[str, Callable[[Tensor], Tensor]]:
        out = super().forward(progress)
        assert self.head is not None  # built together with the projector
        out["head"] = self.head
        return out


@register_loss("kd3_align", paper=KD3_PAPER, reads="features", state=KD3Aligner)
def kd3_align(
    student_features: Tensor,
    teacher_features: Tensor,
    *,
    projector: Callable[[Tensor], Tensor],
    head: Callable[[Tensor], Tensor],
    T: float = 1.0,
    kd: float = 1.0,
    kd_T: float = 4.0,
) -> Tensor:
    r"""KD³'s feature and classifier alignment: SimKD's MSE to the teacher feature, each sample
    weighted by how far the student's prediction (through the teacher's classifier) is from the
    teacher's, plus KD on that prediction (the one the student deploys).

    Tang, Chen, Niu, Sugiyama & Gong, "Distribution Shift Matters for Knowledge Distillation with
    Webly Collected Images", ICCV 2023. The student's feature is projected into the teacher's
    feature space and classified by the teacher's frozen classifier ``h_t`` (classifier alignment:
    the student deploys with the teacher's head, as in SimKD, :class:`KD3Aligner`). With
    ``P(f_s)`` the projected student map and ``f_t`` the teacher's (at a common spatial size, as
    :func:`simkd`), ``GAP`` global average pooling and ``p = softmax(z / T)``:

        z_t,i = h_t(GAP(f_t,i)),   z_s,i = h_t(GAP(P(f_s,i)))
        g_i   = 1/2 * || p(z_t,i) - p(z_s,i) ||_1            (total variation, in [0, 1])
        w_i   = 1 + g_i                                         (no gradient through w)
        L     = 1/N * sum_i w_i * mean_{c,h,w} (P(f_s,i) - f_t,i)^2
              + kd * kd_T^2 * 1/N * sum_i KL(q(z_t,i) || q(z_s,i)),   q = softmax(z / kd_T)

    Samples on which the student still disagrees with the teacher weigh up to twice as much;
    where they agree (``g = 0``) the first part is SimKD's MSE. The second part is Hinton's KD on
    the logits the student deploys (its projected feature through the teacher's classifier), with
    gradient through ``z_s``: on a shifted pool matching features alone leaves that prediction
    untrained where the pool is far from the target data (``kd=0`` gives the MSE part alone). The
    paper's method section was not available offline: this weighting (one plus the
    total-variation gap of the two predictions) is our formula for its "sample-wise weights from
    the teacher-student logit gap", and the KD part our reading of its classifier alignment.

    ``z_t`` equals the teacher's logits when the teacher tap is the feature its classifier reads
    after average pooling (e.g. ``"fc:in"``), which the state checks as SimKD does.
    """
    if not (T > 0 and kd_T > 0):
        raise ValueError(f"kd3_align: the temperatures T and kd_T must be positive, got {T} and {kd_T}")
    if not kd >= 0:
        raise ValueError(f"kd3_align: the KD weight kd must be >= 0, got {kd}")
    projected, t = _projected_pair(student_features, teacher_features, projector, "kd3_align")
    with torch.no_grad():
        z_t = head(torch.flatten(F.adaptive_avg_pool2d(t, 1), 1))
    z_s = head(torch.flatten(F.adaptive_avg_pool2d(projected, 1), 1))
    with torch.no_grad():
        gap = 0.5 * ((z_t / T).softmax(-1) - (z_s.detach() / T).softmax(-1)).abs().sum(-1)
    per_sample = (projected - t).pow(2).flatten(1).mean(1)
    loss = ((1.0 + gap) * per_sample).mean()
    if kd > 0:
        log_q_t = F.log_softmax(z_t / kd_T, dim=-1)
        log_q_s = F.log_softmax(z_s / kd_T, dim=-1)
        kl = (log_q_t.exp() * (log_q_t - log_q_s)).sum(-1).mean()
        loss = loss + (kd * kd_T**2) * kl
    return loss
