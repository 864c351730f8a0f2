"""``protege export`` of a sentence-embedding run's Transformer student: ONNX and int8 ONNX, measured
on the run's held-out texts.

The graph (``model.onnx``) maps token ids and their attention mask, ``input_ids`` / ``attention_mask``
``(N, L)`` int64 (both axes dynamic), to the sentence vectors ``embedding`` ``(N, D)``: the encoder,
the pooling, the Dense layer and the normalisation of the student, so a user only has to tokenise.
The tokenizer is written beside it (``save_pretrained``) with ``embedder.json`` (``max_length``,
``lowercase``, special tokens): :class:`OnnxEmbedder` loads the directory and encodes texts exactly as
the PyTorch student does.

int8 is onnxruntime's **dynamic** quantization (``quantize_dynamic``: int8 weights of every
MatMul/Gemm, activations quantized per batch at run time from their observed range), the usual
choice for Transformer encoders on CPUs: no calibration set, and the LayerNorms, softmax and GELU
stay in float. (Static W8A8, which the classification export uses, needs one fixed range per
activation; an encoder's attention and residual activations vary too much with text length for it.)

The export is measured as the run was: the task's evaluator on the run's test split (else
validation) for the PyTorch student, the fp32 graph and the int8 graph, each against the teacher
(cosine, top-10 neighbour overlap, Spearman of similarities, the probes) and against the fp32
student (``fp32_cos``, ``fp32_knn10``: 1.0 is an exact export).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..engine import make_loader
from ..errors import ProtegeError
from ..metrics.cost import text_throughput
from ..tasks import Task
from ._deps import require
from .latency import machine
from .onnx_io import export_graph, quiet, session

__all__ = ["EMBEDDER_FILE", "OnnxEmbedder", "evaluate_embedders", "export_embedder"]

#: how a directory's tokenisation settings are stored
EMBEDDER_FILE = "embedder.json"
INPUTS = ("input_ids", "attention_mask")
OUTPUT = "embedding"
#: texts an evaluation batch holds
EVAL_BATCH = 64
#: the largest |Δ| between the fp32 graph's vectors and PyTorch's that counts as an exact export
PARITY_TOLERANCE = 1e-4
#: how the exported models are named in tables
LABELS = {"onnx_fp32": "fp32 (onnxruntime)", "int8": "int8 (onnxruntime, dynamic)"}


class _TokenGraph(nn.Module):
    """The student from token ids to sentence vectors (what is traced)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model.embed_tokens(input_ids, attention_mask)["embedding"]


class OnnxEmbedder(nn.Module):
    """An exported sentence encoder: texts -> ``(N, D)`` vectors through onnxruntime.

    ``OnnxEmbedder(directory)`` reads ``model.onnx`` (or ``file``), the tokenizer and
    ``embedder.json`` written by :func:`export_embedder`; :meth:`encode` (also ``model(texts)``)
    tokenises as the PyTorch student did and runs the graph. ``threads``: onnxruntime's intra-op
    threads; by default it follows ``torch.get_num_threads()`` at each call, as a PyTorch model
    does (one session per thread count, made when first needed), so timing it beside PyTorch models
    under ``torch.set_num_threads`` compares like with like."""

    def __init__(self, directory: str | Path, file: str = "model.onnx", threads: int | None = None) -> None:
        super().__init__()
        directory = Path(directory)
        settings_file = directory / EMBEDDER_FILE
        if not settings_file.is_file() or not (directory / file).is_file():
            raise ProtegeError(
                f"{directory} is not an exported sentence encoder (needs {file} and {EMBEDDER_FILE}: "
                "protege export RUN --format onnx|int8)"
            )
        from transformers import AutoTokenizer

        self.settings = json.loads(settings_file.read_text())
        self.tokenizer = AutoTokenizer.from_pretrained(str(directory))
        self.path = directory / file
        self.threads = threads
        self._sessions: dict[int, Any] = {}
        self.dim = int(self.settings["dim"])
        self.max_length = int(self.settings["max_length"])

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        items = [t.lower() for t in texts] if self.settings.get("lowercase") else list(texts)
        if not items or not all(isinstance(t, str) for t in items):
            raise ProtegeError("encode needs a non-empty list of strings")
        batch = self.tokenizer(
            items,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            add_special_tokens=bool(self.settings.get("add_special_tokens", True)),
            return_tensors="np",
        )
        return {name: np.ascontiguousarray(batch[name], dtype=np.int64) for name in INPUTS}

    @property
    def session(self) -> Any:
        """The onnxruntime session for the current thread count."""
        n = self.threads if self.threads is not None else torch.get_num_threads()
        if n not in self._sessions:
            self._sessions[n] = session(self.path, threads=n, spin=False)
        return self._sessions[n]

    def encode(self, texts: Sequence[str]) -> Tensor:
        return torch.from_numpy(self.session.run([OUTPUT], self.tokenize(texts))[0])

    def features(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """``{"embedding": (N, D)}`` (what the embedding task's forward reads)."""
        return {"embedding": self.encode(texts)}

    def forward(self, texts: Sequence[str]) -> Tensor:
        return self.encode(texts)


def _check_student(model: nn.Module) -> None:
    from ..models.embedding import TransformerEmbedder

    if not isinstance(model, TransformerEmbedder):
        raise ProtegeError(
            f"--format onnx / int8 of an embedding run covers Transformer students; this student is a "
            f"{type(model).__name__}: export it with --format native (sentence-transformers and model2vec "
            "load a static student's folder directly, and it is a table lookup, with nothing to quantize "
            "but its storage: `protege.models.static_embedding.save_static(model, dir, dtype='int8')`)"
        )


def _example(model: nn.Module) -> tuple[Tensor, Tensor]:
    """Two texts of different lengths, tokenised: both dynamic axes have size ≥ 2."""
    batch = model.tokenize(["A short sentence to trace the graph.", "Another one, a little longer than it."])
    return batch["input_ids"].cpu(), batch["attention_mask"].cpu()


def export_embedder(
    model: nn.Module,
    task: Task,
    format: str,
    out: Path,
    eval_set: tuple[str, Dataset[Any]] | None,
    teachers: Sequence[nn.Module] = (),
    bench: bool = False,
) -> dict[str, Any]:
    """Write the Transformer student ``model`` to ``out`` as ONNX (``format="onnx"``) or int8 ONNX
    (``"int8"``, dynamic quantization), with its tokenizer and ``embedder.json``; evaluate it beside
    the PyTorch model on ``eval_set`` and, with ``bench``, time them side by side. Returns the
    ``export.json`` entries (``onnx``, ``quantization``, ``parity``, ``evaluation``, ``latency``).

    Raises:
        ProtegeError: a student that is not a Transformer encoder; an fp32 graph whose vectors differ
            from PyTorch's by more than :data:`PARITY_TOLERANCE` (nothing is written).
    """
    if format not in ("onnx", "int8"):
        raise ProtegeError(f"an embedding student exports as native, onnx or int8, not {format!r}")
    _check_student(model)
    require("onnx", "onnxruntime")
    model = model.eval().cpu()
    info: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="protege-export-") as scratch:
        fp32 = (out if format == "onnx" else Path(scratch)) / "model.onnx"
        ids, mask = _example(model)
        info["onnx"] = export_graph(
            _TokenGraph(model),
            (ids, mask),
            fp32,
            INPUTS,
            (OUTPUT,),
            {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"}},
        )
        settings = {
            "dim": int(model.dim),
            "max_length": int(model.max_length),
            "lowercase": bool(model.lowercase),
            "add_special_tokens": bool(model.add_special_tokens),
            "inputs": list(INPUTS),
            "output": OUTPUT,
        }
        for directory in {out, fp32.parent}:  # the export, and the scratch fp32 graph of an int8 one
            model.tokenizer.save_pretrained(str(directory))
            (directory / EMBEDDER_FILE).write_text(json.dumps(settings, indent=1) + "\n")
        exported: dict[str, OnnxEmbedder] = {"onnx_fp32": OnnxEmbedder(fp32.parent, fp32.name)}
        if format == "int8":
            info["quantization"] = _quantize_dynamic(fp32, out / "model.onnx")
            exported["int8"] = OnnxEmbedder(out)
        info["parity"] = _parity(model, exported["onnx_fp32"], eval_set)
        if eval_set is not None:
            split, dataset = eval_set
            info["evaluation"] = {
                "split": split,
                "samples": len(dataset),  # type: ignore[arg-type]
                **evaluate_embedders({"fp32": model, **exported}, dataset, task, teachers),
            }
        if bench:
            info["latency"] = _bench(model, exported, teachers, eval_set)
        for m in exported.values():  # the sessions hold the scratch files open
            m._sessions.clear()
    return info


def _quantize_dynamic(fp32: Path, int8: Path) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from .quantize import graph_summary

    with quiet():
        quantize_dynamic(
            str(fp32),
            str(int8),
            weight_type=QuantType.QInt8,
            per_channel=False,
            op_types_to_quantize=["MatMul", "Gemm"],
        )
    return {
        "method": "onnxruntime quantize_dynamic",
        "format": "QOperator (DynamicQuantizeLinear + MatMulInteger)",
        "weights": "int8, per tensor",
        "activations": "uint8, per batch at run time (no calibration)",
        "graph": graph_summary(int8),
    }


def _parity(
    model: nn.Module, exported: OnnxEmbedder, eval_set: tuple[str, Dataset[Any]] | None
) -> dict[str, Any]:
    texts = list(getattr(eval_set[1], "texts", [])[:64]) if eval_set is not None else []
    texts = texts or ["A short sentence.", "Distillation keeps what the teacher knows in a smaller model."]
    with torch.no_grad():
        want = model.encode(texts).float()
    got = exported.encode(texts)
    gap = float((got - want).abs().max())
    if not gap <= PARITY_TOLERANCE:
        raise ProtegeError(
            f"the exported graph's vectors differ from the PyTorch student's by up to {gap:.3g} "
            f"(> {PARITY_TOLERANCE}); nothing was written. Report this with the student's config."
        )
    return {"samples": len(texts), "inputs": "held-out texts", "max_abs_diff": gap}


def evaluate_embedders(
    models: Mapping[str, nn.Module], dataset: Dataset[Any], task: Task, teachers: Sequence[nn.Module] = ()
) -> dict[str, dict[str, float]]:
    """Each model's metrics on ``dataset``'s texts through ``task``'s forward and evaluator: against
    the first teacher (``cos``, ``knn10``, ``spearman``, the probes) and against ``models["fp32"]``,
    the PyTorch student (``fp32_cos``, ``fp32_knn10``)."""
    if "fp32" not in models:
        raise ProtegeError("evaluate_embedders needs the PyTorch student under 'fp32' as the reference")
    vs_teacher = {name: task.evaluator(with_teacher=bool(teachers)) for name in models}
    vs_fp32 = {name: task.evaluator(with_teacher=True) for name in models}
    modes = {m: m.training for m in [*models.values(), *teachers]}
    try:
        for m in modes:
            m.eval()
        with torch.no_grad():
            for batch in make_loader(dataset, EVAL_BATCH, shuffle=False):
                inputs, target = task.split(batch)
                outs = {name: task.forward(m, inputs) for name, m in models.items()}
                t_out = {"logits": task.forward(teachers[0], inputs)["logits"]} if teachers else None
                for name, o in outs.items():
                    vs_teacher[name].update(o, target, t_out)
                    vs_fp32[name].update(o, target, {"logits": outs["fp32"]["logits"]})
    finally:
        for m, training in modes.items():
            m.train(training)
    result: dict[str, dict[str, float]] = {}
    for name in models:
        row = {k: v for k, v in vs_teacher[name].compute().items() if not k.startswith("teacher/")}
        ref = vs_fp32[name].compute()
        row |= {"fp32_cos": ref["cos"], "fp32_knn10": ref["knn10"]}
        result[name] = row
    if teachers:
        teacher_row = vs_teacher["fp32"].compute()
        result["teacher"] = {
            k.split("/", 1)[1]: v for k, v in teacher_row.items() if k.startswith("teacher/probe/")
        }
    return result


def _bench(
    model: nn.Module,
    exported: Mapping[str, OnnxEmbedder],
    teachers: Sequence[nn.Module],
    eval_set: tuple[str, Dataset[Any]] | None,
) -> dict[str, Any]:
    """Sentences per second, one thread, batch 1 and 64, all models round-robin (tokenisation
    included for every one of them)."""
    texts = list(getattr(eval_set[1], "texts", [])[:256]) if eval_set is not None else []
    texts = texts or ["A short sentence to time.", "Another sentence, a little longer than the first one."]
    named: dict[str, nn.Module] = {"teacher": teachers[0]} if teachers else {}
    named["student fp32 (PyTorch)"] = model
    for key, m in exported.items():
        named[f"student {LABELS[key]}"] = m  # its sessions follow torch's thread count (1 here)
    with torch.no_grad():
        speed = text_throughput(named, texts, batch_sizes=(1, 64), threads=(1,), max_seconds=10.0, iters=10)
    return {"threads": 1, "texts": len(texts), "rows": speed, "machine": machine()}
