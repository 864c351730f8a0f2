"""Random bad run configs, and what running one through the CLI did: shared by the fuzz test
(``tests/test_fuzz_config.py``) and the reliability report (``benchmarks/reliability.py``).

A case is ``(command, config)``: a small valid config (digits, ``mlp_s`` on 8x8 inputs, an optional
``mlp`` teacher without weights, CE + KD, one epoch) with one to four random mutations: keys
deleted at any depth, values swapped for another type, numbers out of range, unknown keys, deep
garbage, unknown loss/model/source names, misspelled term keys. :func:`run_case` writes it as
YAML and runs ``protege <command> run.yaml`` in this process with ``protege.pipeline.fit``
replaced by a stub that records the call (a config that passes every validation reaches ``fit``
and trains nothing). :func:`verdict` says what happened: ``valid`` (the stub fit was reached),
``clear`` (exit code 2, one ``error:`` message, no traceback, nothing written), or a failure:
``traceback`` (an exception escaped, or one printed) or ``silent-wrong`` (any other exit, or a
refused config that left files behind).
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import yaml
from hypothesis import strategies as st

from protege.losses import list_losses

NAN = float("nan")
MLP8 = {"input_size": 8}

#: strings that are names, paths, numbers or nothing at all; none is absolute or leaves the
#: case's folder by more than one level (a case runs in <root>/cwd, and <root> is checked)
STRINGS = ["", " ", "x", "nope", "ü-ß", "\x00", "a" * 300, "..", "1e3", "-1", "true", "null", "{a: 1}", "\t"]
#: valid-looking spellings of the keys of the schema, for unknown keys and wrong term keys
KEY_TYPOS = ["epoch", "lr", "studnet", "teachers_", "Temperature", "t", "wieght", "losses", "data_", "kwarg"]
#: numbers out of every range: negative, zero, huge, not finite
OUT_OF_RANGE = [-1, -(10**6), 0, 0.0, -0.5, 10**9, 2**64, 1e300, NAN, math.inf, -math.inf]
#: unknown names of the things a config names (and some registered ones in the wrong place)
NAMES = {
    ("data", "source"): ["digitz", "mnist", "torchvision:nope", "imagefolder", "hf", ""],
    ("student", "model"): ["mlp_xl", "resnet", "timm:nope", "torchvision:nope", "protege:nope", "", "::"],
    ("teacher", "model"): ["mlp_xl", "timm:nope", "torchvision:nope", " "],
    ("optim", "name"): ["adam_w", "SGD", "lion"],
    ("schedule", "name"): ["cos", "linear", ""],
}
LOSSES = ["kd2", "KD", "", "cross_entropy"] + sorted(info.name for info in list_losses())


def base_config(output_dir: str, teacher: bool = True) -> dict[str, Any]:
    """The valid config every case starts from (it trains in seconds; the fuzz never trains it)."""
    cfg: dict[str, Any] = {
        "name": "fuzz",
        "output_dir": output_dir,
        "data": {
            "source": "digits",
            "batch_size": 64,
            "num_workers": 0,
            "val_fraction": 0.1,
            "split_seed": 0,
        },
        "student": {"model": "mlp_s", "kwargs": dict(MLP8)},
        "terms": [{"loss": "ce", "weight": 0.1}, {"loss": "kd", "weight": 0.9, "T": 4}],
        "epochs": 1,
        "seed": 0,
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        "schedule": {"name": "cosine", "warmup_epochs": 0},
        "progress": False,
        "measure_cost": False,
    }
    if teacher:
        cfg["teacher"] = {"model": "mlp", "kwargs": dict(MLP8)}
    return cfg


#: where a case's output_dir points: the runs/ folder of the case's working directory
OUTPUT_DIR = "runs"


# -- mutations ------------------------------------------------------------------------------------

Path_ = tuple[Any, ...]


def _paths(node: Any, prefix: Path_ = ()) -> list[Path_]:
    """Every key path below ``node`` (dict keys and list indices), parents before children."""
    out: list[Path_] = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        out.append((*prefix, key))
        out.extend(_paths(value, (*prefix, key)))
    return out


def _get(node: Any, path: Path_) -> Any:
    for key in path:
        node = node[key]
    return node


def _set(cfg: dict[str, Any], path: Path_, value: Any) -> None:
    _get(cfg, path[:-1])[path[-1]] = value


def _sort_key(path: Path_) -> tuple[str, ...]:
    return tuple(str(p) for p in path)


_scalar = st.one_of(
    st.integers(-3, 3), st.sampled_from(STRINGS), st.none(), st.just(NAN), st.booleans(), st.floats()
)
GARBAGE = st.recursive(
    _scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.one_of(st.sampled_from(KEY_TYPOS + STRINGS[:4]), st.integers(0, 3)), inner, max_size=3
        ),
    ),
    max_leaves=12,
)
#: a value of each type a swap may put in
BY_TYPE = {
    "int": st.sampled_from([-1, 0, 1, 7, 10**9]),
    "str": st.sampled_from(STRINGS),
    "list": st.lists(_scalar, max_size=3),
    "dict": st.dictionaries(st.sampled_from(KEY_TYPOS), _scalar, max_size=2),
    "none": st.none(),
    "nan": st.just(NAN),
    "bool": st.booleans(),
    "float": st.sampled_from([0.5, -2.5, 1e-9, 3.0]),
}


def _type_of(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else "float"
    return {int: "int", str: "str", list: "list", dict: "dict"}.get(type(value), "none")


def _delete(draw: Any, cfg: dict[str, Any]) -> None:
    path = draw(st.sampled_from(sorted(_paths(cfg), key=_sort_key)))
    del _get(cfg, path[:-1])[path[-1]]


def _swap_type(draw: Any, cfg: dict[str, Any]) -> None:
    path = draw(st.sampled_from(sorted(_paths(cfg), key=_sort_key)))
    kind = draw(st.sampled_from(sorted(set(BY_TYPE) - {_type_of(_get(cfg, path))})))
    _set(cfg, path, draw(BY_TYPE[kind]))


def _out_of_range(draw: Any, cfg: dict[str, Any]) -> None:
    numbers = [
        p
        for p in _paths(cfg)
        if isinstance(_get(cfg, p), (int, float)) and not isinstance(_get(cfg, p), bool)
    ]
    if numbers:
        _set(cfg, draw(st.sampled_from(sorted(numbers, key=_sort_key))), draw(st.sampled_from(OUT_OF_RANGE)))


def _unknown_key(draw: Any, cfg: dict[str, Any]) -> None:
    sections = [()] + [p for p in _paths(cfg) if isinstance(_get(cfg, p), dict)]
    where = _get(cfg, draw(st.sampled_from(sorted(sections, key=_sort_key))))
    where[draw(st.sampled_from(KEY_TYPOS + ["x", "ü-ß"]))] = draw(GARBAGE)


def _garbage(draw: Any, cfg: dict[str, Any]) -> None:
    deep = draw(st.integers(1, 40))
    value: Any = draw(GARBAGE)
    for i in range(deep):  # nest it deeply: a dict of lists of dicts ...
        value = {"a": value} if i % 2 else [value]
    _set(cfg, draw(st.sampled_from(sorted(_paths(cfg), key=_sort_key))), value)


def _unknown_name(draw: Any, cfg: dict[str, Any]) -> None:
    spots = [(p, names) for p, names in NAMES.items() if isinstance(cfg.get(p[0]), dict)]
    terms = (
        [i for i, t in enumerate(cfg.get("terms") or []) if isinstance(t, dict)]
        if isinstance(cfg.get("terms"), list)
        else []
    )
    choice = draw(st.integers(0, len(spots) + len(terms) - 1)) if spots or terms else None
    if choice is None:
        return
    if choice < len(spots):
        path, names = spots[choice]
        _set(cfg, path, draw(st.sampled_from(names)))
    else:
        cfg["terms"][terms[choice - len(spots)]]["loss"] = draw(st.sampled_from(LOSSES))


def _term_keys(draw: Any, cfg: dict[str, Any]) -> None:
    terms = cfg.get("terms")
    if not isinstance(terms, list) or not any(isinstance(t, dict) for t in terms):
        return
    term = draw(st.sampled_from([t for t in terms if isinstance(t, dict)]))
    if term and draw(st.booleans()):  # rename a key it has
        key = draw(st.sampled_from(sorted(term, key=str)))
        term[draw(st.sampled_from(KEY_TYPOS + ["student", "teacher", "adapter", "teacher_index", "T"]))] = (
            term.pop(key)
        )
    else:  # add one, registered for some loss or not
        key = draw(
            st.sampled_from(KEY_TYPOS + ["T", "alpha", "beta", "student", "teacher", "adapter", "warmup"])
        )
        term[key] = draw(st.one_of(GARBAGE, st.sampled_from(["layer1", "layer2", "fc", "auto", "linear"])))


MUTATIONS = {
    "delete": _delete,
    "swap_type": _swap_type,
    "out_of_range": _out_of_range,
    "unknown_key": _unknown_key,
    "garbage": _garbage,
    "unknown_name": _unknown_name,
    "term_keys": _term_keys,
}


@st.composite
def cases(draw: Any) -> tuple[str, dict[str, Any]]:
    """A command (``train`` or ``distill``) and a mutated config (see the module docstring)."""
    cfg = base_config(OUTPUT_DIR, teacher=draw(st.booleans()))
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 2, 3, 4]))):  # one alone reaches deepest
        if not isinstance(cfg, dict) or not cfg:
            break
        MUTATIONS[draw(st.sampled_from(sorted(MUTATIONS)))](draw, cfg)
    command = draw(st.sampled_from(["distill", "train"]))
    return command, cfg


# -- running a case --------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What ``protege <args>`` did in this process."""

    code: int | None  # the exit code; None: an exception escaped main()
    stdout: str
    stderr: str
    fit_calls: int  # how often the stub fit was reached
    escaped: str = ""  # the traceback of an exception that escaped main()
    new_files: list[str] = field(default_factory=list)  # what appeared under the case's root


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def stub_summary() -> dict[str, Any]:
    """What the stub fit returns: a summary without checkpoints (nothing is tested or exported)."""
    return {
        "status": "completed",
        "epochs_completed": 0,
        "epochs": 0,
        "final": {},
        "best": {},
        "checkpoints": {},
    }


def run_cli(args: list[str], root: Path, cwd: Path | None = None, stub_fit: bool = True) -> Outcome:
    """Run ``protege *args`` in this process (``protege.cli.main``), in ``cwd`` (default ``root/cwd``),
    capturing its output; with ``stub_fit``, ``protege.pipeline.fit`` only records the call (and no
    report is written). Reports every file that appeared under ``root``."""
    from protege import cli, pipeline
    from protege.analysis import runs

    cwd = cwd or root / "cwd"
    cwd.mkdir(parents=True, exist_ok=True)
    before = _listing(root)
    calls: list[Any] = []

    def fake_fit(*args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append((args, kwargs))
        return stub_summary()

    out, err = io.StringIO(), io.StringIO()
    code: int | None = None
    escaped = ""
    here = os.getcwd()
    with contextlib.ExitStack() as stack:
        if stub_fit:
            stack.enter_context(mock.patch.object(pipeline, "fit", fake_fit))
            stack.enter_context(mock.patch.object(runs, "write_run_report", lambda cfg: None))
        stack.enter_context(mock.patch.object(sys, "argv", ["protege", *args]))
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        os.chdir(cwd)
        try:
            cli.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception:
            escaped = traceback.format_exc()
        finally:
            os.chdir(here)
    new = sorted(_listing(root) - before)
    return Outcome(code, out.getvalue(), err.getvalue(), len(calls), escaped, new)


def write_config(cfg: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def run_case(command: str, cfg: dict[str, Any], root: Path | None = None) -> Outcome:
    """Write ``cfg`` to ``<root>/cwd/run.yaml`` and run ``protege <command>`` on it with the stub fit
    (``root``: a fresh temporary folder, removed afterwards, unless given)."""
    _refuse_fork_bomb(cfg)
    with contextlib.ExitStack() as stack:
        if root is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="protege-fuzz-")))
        (root / "cwd").mkdir(parents=True, exist_ok=True)
        path = write_config(copy.deepcopy(cfg), root / "cwd" / "run.yaml")
        return run_cli([command, str(path)], root)


def _refuse_fork_bomb(cfg: dict[str, Any]) -> None:
    """Never run a case whose ``data.num_workers`` validates to more than 256 (10**9, or 1e300 which
    pydantic takes as a whole number): the first batch would fork until the machine runs out of
    memory (it did, before the schema bounded it)."""
    from protege.config import DataConfig

    data = cfg.get("data")
    if not isinstance(data, dict) or "num_workers" not in data:
        return
    try:
        workers = DataConfig(num_workers=data["num_workers"]).num_workers
    except ValueError:
        return
    if workers > 256:
        raise AssertionError(
            f"data.num_workers {workers} passes validation: this case would fork {workers} workers"
        )


def clear_error(outcome: Outcome) -> bool:
    """Exit code 2 with one ``error:`` message (after warnings, if any), no traceback, nothing written."""
    text = " ".join(outcome.stderr.split())
    starts = text.startswith("error:") or (text.startswith("warning:") and " error: " in text)
    return (
        outcome.code == 2
        and not outcome.escaped
        and starts
        and "Traceback" not in outcome.stderr + outcome.stdout
        and not outcome.new_files
    )


def verdict(outcome: Outcome) -> str:
    """``valid``, ``clear``, ``traceback`` or ``silent-wrong`` (see the module docstring)."""
    if outcome.escaped or "Traceback" in outcome.stderr + outcome.stdout:
        return "traceback"
    if outcome.fit_calls:
        return "valid" if outcome.code == 0 else "silent-wrong"
    return "clear" if clear_error(outcome) else "silent-wrong"


def describe(outcome: Outcome) -> str:
    """Everything about an outcome, for a failure message."""
    return (
        f"exit code {outcome.code}, fit reached {outcome.fit_calls}x, new files {outcome.new_files}\n"
        f"--- stderr\n{outcome.stderr}\n--- stdout\n{outcome.stdout[-2000:]}\n--- escaped\n{outcome.escaped}"
    )
