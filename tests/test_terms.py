"""The short term constructors build the registered loss with the papers' default weights."""

from __future__ import annotations

import pytest

import protege as pg
from protege.config import TermConfig
from protege.core.distiller import Term
from protege.losses import get_loss, registry


@pytest.mark.parametrize(
    ("term", "loss", "weight", "student"),
    [
        (pg.sp("layer3", "layer3"), "sp", 3000.0, "layer3"),
        (pg.rkd(), "rkd", 1.0, "fc:in"),
        (pg.pkt(), "pkt", 30000.0, "fc:in"),
        (pg.vid("layer2", "layer2"), "vid", 1.0, "layer2"),
        (pg.ft("layer3", "layer3", phase="paraphrase"), "ft", 500.0, "layer3"),
        (pg.fsp(["layer1", "layer2"], ["layer1", "layer2"]), "fsp", 1.0, ["layer1", "layer2"]),
        (pg.ab("layer2.0", "layer2.1"), "ab", 3e-3, "layer2.0"),
        (pg.crd(), "crd", 0.8, "fc:in"),
        (pg.reviewkd(["layer1", "fc:in"], ["layer1", "fc:in"]), "reviewkd", 1.0, ["layer1", "fc:in"]),
        (pg.simkd("layer3", "layer3"), "simkd", 1.0, "layer3"),
    ],
)
def test_constructors(term, loss, weight, student):
    assert term.loss == loss and term.weight == weight and term.student_key == student
    assert term.info is pg.get_loss(loss)


def test_constructor_params_reach_the_loss():
    assert pg.ft("a", "b", phase="paraphrase").params["phase"] == "paraphrase"
    assert pg.ab("a", "b").adapter_kind == "conv_bn"
    assert pg.reviewkd(["a"], ["b"]).warmup == 20.0
    assert pg.simkd("a", "b", head="classifier").state.head_path == "classifier"


def test_a_loss_declares_the_keys_a_term_reads_by_default(monkeypatch):
    """``register_loss(default_keys=...)``: what a term that names no student or teacher reads, from
    Python (``Term``) and from a config (``TermConfig``); keys a term names win."""
    monkeypatch.setattr(registry, "_LOSSES", dict(registry._LOSSES))
    with pytest.raises(ValueError, match="default_keys"):
        registry.register_loss("bad_keys", paper="-", default_keys=("image_embeds",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="default_keys"):
        registry.register_loss("bad_keys", paper="-", default_keys=("image_embeds", ""))

    @registry.register_loss("two_keys", paper="-", reads="feature-list", default_keys=(["a", "b"], "c"))
    def two_keys(student, teacher):
        return student[0].sum()

    assert get_loss("two_keys").default_keys == (("a", "b"), "c")
    assert (Term("two_keys").student_key, Term("two_keys").teacher_key) == (["a", "b"], "c")
    assert Term("two_keys", teacher="d").student_key == ["a", "b"]
    assert (TermConfig(loss="two_keys").student, TermConfig(loss="two_keys").teacher) == (["a", "b"], "c")
    assert TermConfig(loss="two_keys", student="x").model_dump()["teacher"] == "c"
    # a loss that declares none reads the logits; an unknown loss is left for the term to report
    assert get_loss("kd").default_keys == ("logits", "logits") and Term("kd").student_key == "logits"
    assert TermConfig(loss="kd").student == "logits" and TermConfig(loss="nonsense").student == "logits"
