"""How protege takes bad input and kills: random configs, named bad inputs, kill -9 during writes.

Three parts, each run through the CLI (``protege.cli.main``, in this process):

(a) **fuzz**: ``--fuzz N`` random configs from the generator of ``tests/fuzz_configs.py`` (a small
    valid config with 1-4 random mutations; ``pipeline.fit`` stubbed, so nothing trains). A config
    either reaches ``fit`` (``valid``: it passed every check) or must be a clear error.
(b) **named**: the hand-written bad inputs of issue 17 and ``tests/test_reliability.py`` (a non-UTF-8
    config, a directory as config path, duplicate keys, a negative weight, num_classes against the
    data, fitnet shapes without an adapter, ickd taps, T: 0, a corrupt image, an empty val/, a
    changed config on resume, damaged checkpoints ...) and those the fuzz found. Each must be a
    clear error with its expected message, or, for a damaged checkpoint with an intact one to fall
    back to, a run that completes and says what it skipped (``recovered``). Reaching ``fit`` with
    a bad input is silent-wrong.
(c) **kills**: the kill points of ``tests/kill_points.py`` (SIGKILL inside a checkpoint write, a
    ``metrics.jsonl`` append, a ``pointers.json`` write), each resumed; survived = the run completes,
    nothing of the cut write remains, and ``metrics.jsonl`` equals an uninterrupted run's.

A *clear error* is exit code 2, one ``error:`` message, no traceback and nothing written (no new
file, no existing file changed; a run's ``.lock`` is not counted). A *traceback* is an exception
that escaped ``main`` or a printed one. *Silent-wrong* is any other outcome of a bad input: exit
code 0 or 1 without a clear error, a run directory left half written, the wrong message.

    python benchmarks/reliability.py [--fuzz 1000] [--seed 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import atexit
import collections
import copy
import functools
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the shared generators

from fuzz_configs import (  # noqa: E402
    OUTPUT_DIR,
    Outcome,
    base_config,
    cases,
    clear_error,
    run_case,
    run_cli,
    verdict,
    write_config,
)
from kill_points import KILL_POINTS, metrics, start_killed, wait_killed, write_run_config  # noqa: E402


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (run locks left out: they name their last holder)."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != ".lock"
    }


# -- (a) fuzz ---------------------------------------------------------------------------------------


def fuzz(n: int, seed: int | None) -> collections.Counter[str]:
    """Verdicts of ``n`` generated configs (hypothesis, generation only: no shrinking)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hyp_seed

    counts: collections.Counter[str] = collections.Counter()
    failures: list[tuple[str, Any, str]] = []

    @settings(
        max_examples=n,
        phases=[Phase.generate],
        database=None,
        deadline=None,
        derandomize=seed is None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases())
    def one(case: tuple[str, dict[str, Any]]) -> None:
        try:
            outcome = run_case(*case)
        except AssertionError as e:  # the harness refused to run it (it would fork 10**9 workers)
            counts["silent-wrong"] += 1
            failures.append(("silent-wrong", case, str(e)))
            return
        result = verdict(outcome)
        counts[result] += 1
        if result not in ("valid", "clear"):
            failures.append((result, case, outcome.stderr[-500:] + outcome.escaped[-1500:]))

    (hyp_seed(seed)(one) if seed is not None else one)()
    for result, case, text in failures:
        print(f"[fuzz] {result}: {case!r}\n{text}", file=sys.stderr)
    return counts


# -- (b) named bad inputs -------------------------------------------------------------------------


@dataclass
class Named:
    name: str
    run: Callable[[Path], tuple[list[str], Path]]  # prepares root, returns the CLI args and the cwd
    expect: str  # in the (whitespace-normalized) stderr
    kind: str = "error"  # or "recover": exit 0, the run completes, the message says what was skipped


def _yaml_case(content: bytes) -> Callable[[Path], tuple[list[str], Path]]:
    def prepare(root: Path) -> tuple[list[str], Path]:
        path = root / "cwd" / "run.yaml"
        path.write_bytes(content)  # output_dir: default runs/, in the case's cwd
        return ["train", str(path)], root / "cwd"

    return prepare


def _config_case(command: str, change: Callable[[dict[str, Any]], None], extra: tuple[str, ...] = ()):
    def prepare(root: Path) -> tuple[list[str], Path]:
        cfg = base_config(OUTPUT_DIR)
        change(cfg)
        return [command, str(write_config(cfg, root / "cwd" / "run.yaml")), *extra], root / "cwd"

    return prepare


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(cfg: dict[str, Any]) -> None:
        keys = [int(k) if k.isdigit() else k for k in path.split(".")]
        node = cfg
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = copy.deepcopy(value)

    return change


def _cnn_terms(terms: list[dict[str, Any]]) -> Callable[[dict[str, Any]], None]:
    def change(cfg: dict[str, Any]) -> None:
        cfg["teacher"] = {"model": "cnn_m", "kwargs": {"widths": [8, 16, 16]}}
        cfg["student"] = {"model": "cnn_m", "kwargs": {"widths": [4, 8, 8]}}
        cfg["terms"] = terms

    return change


def _image_folder(root: Path, bad: bool, val_images: int) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", val_images)):
        for c in "ab":
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray((rng.random((12, 12, 3)) * 255).astype("uint8")).save(
                    root / split / c / f"{i}.png"
                )
    if bad:
        (root / "train" / "b" / "broken.png").write_bytes(b"not an image")
    return root


def _images_case(bad: bool, val_images: int):
    def prepare(root: Path) -> tuple[list[str], Path]:
        images = _image_folder(root / "images", bad, val_images)
        cfg = base_config(OUTPUT_DIR, teacher=False)
        cfg["data"] = {"source": "imagefolder", "root": str(images), "batch_size": 64}
        cfg["student"] = {"model": "mlp_s", "kwargs": {"input_size": 8}}
        cfg["terms"] = [{"loss": "ce"}]
        return ["train", str(write_config(cfg, root / "cwd" / "run.yaml"))], root / "cwd"

    return prepare


def _run_config(root: Path) -> dict[str, Any]:
    """The run the resume cases start from: digits, mlp_s, 3 epochs, constant lr."""
    return {
        "name": "r",
        "output_dir": str(root / "runs"),
        "data": {"source": "digits", "batch_size": 128},
        "student": {"model": "mlp_s", "kwargs": {"input_size": 8}},
        "epochs": 3,
        "progress": False,
        "measure_cost": False,
        "schedule": {"name": "constant"},
        "optim": {"lr": 0.1},
    }


def _train(cfg: dict[str, Any], root: Path, stop_after: int | None, resume: bool = False) -> None:
    """Train ``cfg`` for real (``stop_after`` epochs of it), quietly."""
    from protege import pipeline

    real_fit = pipeline.fit
    fit = functools.partial(real_fit, stop_after_epochs=stop_after) if stop_after else real_fit
    root.mkdir(parents=True, exist_ok=True)
    path = write_config(cfg, root / "train.yaml")
    with mock.patch.object(pipeline, "fit", fit):
        outcome = run_cli(["train", str(path), *(["--resume"] if resume else [])], root, stub_fit=False)
    assert outcome.code == 0, outcome.stderr + outcome.escaped


@functools.cache
def _paused_template() -> Path:
    """A 3-epoch run stopped after 2 epochs (as a preempted job leaves it), trained once and copied
    into each case that needs it; beside it, one whose last checkpoint has an older one kept."""
    root = Path(tempfile.mkdtemp(prefix="protege-reliability-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    _train(_run_config(root / "paused"), root / "paused", stop_after=2)
    two = root / "two"
    cfg = _run_config(two)
    _train(cfg, two, stop_after=1)
    ckpt = two / "runs" / "r" / "checkpoints"
    shutil.copytree(ckpt / "epoch_0000", two / "epoch_0000")
    _train(cfg, two, stop_after=1, resume=True)
    shutil.copytree(two / "epoch_0000", ckpt / "epoch_0000")
    (ckpt / "pointers.json").write_text(json.dumps({"last": "epoch_0001", "best": "epoch_0000"}))
    return root


def _resume_case(
    template: str,
    damage: Callable[[Path], None],
    overrides: tuple[str, ...] = (),
    extra: tuple[str, ...] = (),
):
    def prepare(root: Path) -> tuple[list[str], Path]:
        shutil.copytree(_paused_template() / template / "runs", root / "runs")
        stored = root / "runs" / "r" / "config.yaml"  # the run as if it had been started here
        stored.write_text(
            yaml.safe_dump({**yaml.safe_load(stored.read_text()), "output_dir": str(root / "runs")})
        )
        damage(root / "runs" / "r")
        cfg = _run_config(root)
        path = write_config(cfg, root / "cwd" / "run.yaml")
        sets = [a for o in overrides for a in ("--set", o)]
        return ["train", str(path), "--resume", *sets, *extra], root / "cwd"

    return prepare


def _last(run_dir: Path) -> Path:
    ckpt = run_dir / "checkpoints"
    return ckpt / json.loads((ckpt / "pointers.json").read_text())["last"]


def _truncate(name: str) -> Callable[[Path], None]:
    def damage(run_dir: Path) -> None:
        file = _last(run_dir) / name
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])

    return damage


def _empty_all_rng(run_dir: Path) -> None:
    for folder in (run_dir / "checkpoints").glob("epoch_*"):
        (folder / "rng.safetensors").write_bytes(b"")


def _no_damage(run_dir: Path) -> None:
    pass


def _torn_pointers(run_dir: Path) -> None:
    (run_dir / "checkpoints" / "pointers.json").write_text('{"last": "epo')


def _locked_case(root: Path) -> tuple[list[str], Path]:
    """A run whose directory another process is writing (it holds the lock)."""
    cfg = _run_config(root)
    run_dir = root / "runs" / "r"
    run_dir.mkdir(parents=True)
    code = (
        "import sys, time\nfrom pathlib import Path\nfrom protege.files import exclusive_lock\n"
        "with exclusive_lock(Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    _HOLDERS.append(holder)
    return ["train", str(write_config(cfg, root / "cwd" / "run.yaml")), "--overwrite"], root / "cwd"


_HOLDERS: list[subprocess.Popen[str]] = []

NAMED = [
    Named("non-UTF-8 config", _yaml_case(b"name: \xe9t\xe9\nstudent: {model: mlp_s}"), "is not UTF-8 text"),
    Named(
        "directory as the config path", lambda root: (["train", str(root)], root / "cwd"), "is a directory"
    ),
    Named(
        "config file missing", lambda root: (["train", str(root / "nope.yaml")], root / "cwd"), "not found"
    ),
    Named("not YAML", _yaml_case(b"name: [a\nstudent: {model: mlp_s}"), "is not valid YAML"),
    Named("YAML list, not a mapping", _yaml_case(b"- a\n- b"), "must hold a mapping"),
    Named("duplicate key", _yaml_case(b"name: a\nepochs: 2\nepochs: 3\nstudent: {model: mlp_s}"), "twice"),
    Named("unknown key (typo)", _config_case("distill", _set("epoch", 3)), "did you mean 'epochs'"),
    Named("unknown loss", _config_case("distill", _set("terms.1.loss", "kd2")), "unknown loss"),
    Named("unknown model", _config_case("distill", _set("student.model", "mlp_xl")), "unknown model"),
    Named(
        "unknown data source", _config_case("distill", _set("data.source", "digitz")), "unknown data source"
    ),
    Named("misspelled term key", _config_case("distill", _set("terms.1.Temp", 2)), "has no parameter 'Temp'"),
    Named("negative weight", _config_case("distill", _set("terms.0.weight", -1)), "weight -1.0 is negative"),
    Named("NaN weight", _config_case("distill", _set("terms.0.weight", math.nan)), "finite number"),
    Named(
        "num_classes against the data",
        _config_case("distill", _set("student.kwargs.num_classes", 100)),
        "kwargs.num_classes is 100, but the data (digits) has 10",
    ),
    Named(
        "fitnet shapes without an adapter",
        _config_case("distill", _cnn_terms([{"loss": "fitnet", "student": "layer2", "teacher": "layer2"}])),
        "same (N, ...) shape",
    ),
    Named(
        "ickd incompatible taps",
        _config_case("distill", _cnn_terms([{"loss": "ickd", "student": "layer1", "teacher": "layer2"}])),
        "number of channels",
    ),
    Named("T: 0", _config_case("distill", _set("terms.1.T", 0)), "temperature T must be positive"),
    Named("corrupt image", _images_case(bad=True, val_images=2), "cannot read image"),
    Named("empty val/", _images_case(bad=False, val_images=0), "holds no images"),
    Named(
        "--override-config without --resume",
        _config_case("distill", _no_damage, ("--override-config",)),
        "--override-config only applies with --resume",
    ),
    Named(
        "distill with no teacher term",
        _config_case("distill", _set("terms", [{"loss": "ce"}])),
        "no term reads",
    ),
    # -- found by the fuzz (tests/test_fuzz_config.py @examples) --
    Named("seed 2**64", _config_case("train", _set("seed", 2**64)), "seed: Input should be less than"),
    Named(
        "MLP input_size -1",
        _config_case("distill", _set("student.kwargs.input_size", -1)),
        "input_size must be",
    ),
    Named("MLP input_size 10**9", _config_case("distill", _set("student.kwargs.input_size", 10**9)), "mlp_s"),
    Named("run name of 300 bytes", _config_case("distill", _set("name", "a" * 300)), "at most 255 bytes"),
    Named("NUL byte in output_dir", _config_case("distill", _set("output_dir", "a\x00b")), "NUL character"),
    Named("a file where the run goes", _config_case("train", _set("output_dir", "run.yaml")), "is a file"),
    Named(
        "loss parameter a list", _config_case("distill", _set("terms.1.T", [1])), "T must be a finite number"
    ),
    Named(
        "loss parameter 2**64", _config_case("distill", _set("terms.1.T", 2**64)), "T must be a finite number"
    ),
    Named(
        "batch_size 2**64", _config_case("train", _set("data.batch_size", 2**64)), "batch_size: Input should"
    ),
    Named(
        "teacher_index past the teachers",
        _config_case("distill", _set("terms.1.teacher_index", 5)),
        "use 0 to 0",
    ),
    Named(
        "a stage's bad term",
        _config_case(
            "distill", _set("stages", [{"name": "a", "epochs": 1, "terms": [{"loss": "kd", "T": [1]}]}])
        ),
        "T must be a finite number",
    ),
    # -- resuming --
    Named("resume without a checkpoint", _config_case("train", _no_damage, ("--resume",)), "cannot resume"),
    Named(
        "changed config on resume",
        _resume_case("paused", _no_damage, ("optim.lr=0.05",)),
        "optim.lr: 0.1 -> 0.05",
    ),
    Named(
        "override with another student",
        _resume_case("paused", _no_damage, ("student.kwargs.hidden_sizes=[7]",), ("--override-config",)),
        "does not fit this run's models",
    ),
    Named(
        "damaged checkpoint, nothing to fall back to",
        _resume_case("paused", _truncate("model.safetensors")),
        "no intact checkpoint",
    ),
    Named("no intact checkpoint", _resume_case("paused", _empty_all_rng), "--overwrite"),
    Named("second writer while the run is locked", _locked_case, "one writer per run"),
    Named(
        "damaged last checkpoint, older one intact",
        _resume_case("two", _truncate("model.safetensors")),
        "skipped damaged checkpoint epoch_0001",
        "recover",
    ),
    Named(
        "truncated trainer.json, older one intact",
        _resume_case("two", _truncate("trainer.json")),
        "skipped damaged checkpoint epoch_0001",
        "recover",
    ),
    Named("damaged pointers.json", _resume_case("paused", _torn_pointers), "", "recover"),
]


def run_named(case: Named) -> tuple[str, Outcome]:
    """``clear``, ``recovered``, ``traceback`` or ``silent-wrong`` (a bad input that ran, the wrong
    message, files written or changed)."""
    with tempfile.TemporaryDirectory(prefix="protege-named-") as tmp:
        root = Path(tmp)
        (root / "cwd").mkdir()
        args, cwd = case.run(root)
        before = snapshot(root)
        outcome = run_cli(args, root, cwd=cwd, stub_fit=False)
        for holder in _HOLDERS:
            holder.kill()
            holder.wait()
        _HOLDERS.clear()
        after = snapshot(root)
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        text = " ".join(outcome.stderr.split())
        if verdict(outcome) == "traceback":
            return "traceback", outcome
        if case.kind == "recover":
            done = outcome.code == 0 and case.expect in text and "completed" in outcome.stdout
            return ("recovered" if done else "silent-wrong"), outcome
        outcome.new_files = outcome.new_files or changed
        ok = clear_error(outcome) and case.expect in text
        return ("clear" if ok else "silent-wrong"), outcome


# -- (c) kill points --------------------------------------------------------------------------------


def kills() -> dict[str, bool]:
    """Each kill point: did the resumed run complete exactly, with nothing of the cut write left?"""
    with tempfile.TemporaryDirectory(prefix="protege-kills-") as tmp:
        root = Path(tmp)
        proc = start_killed({point: root / point for point in KILL_POINTS})
        reference = root / "reference"
        outcome = run_cli(["train", str(write_run_config(reference))], reference, stub_fit=False)
        assert outcome.code == 0, outcome.stderr
        signals = wait_killed(proc)
        survived = {}
        for point in KILL_POINTS:
            outcome = run_cli(
                ["train", str(root / point / "run.yaml"), "--resume"], root / point, stub_fit=False
            )
            run_dir = root / point / "runs" / "k"
            left = [p.name for p in (run_dir / "checkpoints").glob(".*")]
            exact = outcome.code == 0 and metrics(run_dir) == metrics(reference / "runs" / "k")
            survived[point] = signals[point] == 9 and exact and not left
        return survived


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fuzz", type=int, default=1000, help="random configs (part a)")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: derandomized)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the killed subprocesses run one thread: the same floats here

    t0 = time.perf_counter()
    fuzzed = fuzz(args.fuzz, args.seed)
    t_fuzz = time.perf_counter() - t0
    named: dict[str, str] = {}
    for case in NAMED:
        result, outcome = run_named(case)
        named[case.name] = result
        if result not in ("clear", "recovered"):
            print(
                f"[named] {case.name}: {result}\n{outcome.stderr[-800:]}{outcome.escaped[-2000:]}",
                file=sys.stderr,
            )
    t_named = time.perf_counter() - t0 - t_fuzz
    killed = kills()
    t_kills = time.perf_counter() - t0 - t_fuzz - t_named

    counts = collections.Counter(named.values())
    rows = [
        (
            "(a) fuzz: random configs",
            sum(fuzzed.values()),
            fuzzed["clear"],
            fuzzed["valid"],
            0,
            fuzzed["traceback"],
            fuzzed["silent-wrong"],
            "—",
            t_fuzz,
        ),
        (
            "(b) named bad inputs",
            len(named),
            counts["clear"],
            0,
            counts["recovered"],
            counts["traceback"],
            counts["silent-wrong"],
            "—",
            t_named,
        ),
        (
            "(c) kill -9 mid-write, then --resume",
            len(killed),
            0,
            0,
            0,
            0,
            0,
            f"{sum(killed.values())}/{len(killed)}",
            t_kills,
        ),
    ]
    print(
        "| part | cases | clear errors | valid (reached fit) | recovered | tracebacks | silent-wrong "
        "| kills survived (exact resume) | seconds |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, n, clear, valid, recovered, tb, silent, survived, secs in rows:
        print(
            f"| {name} | {n} | {clear} | {valid} | {recovered} | {tb} | {silent} | {survived} | {secs:.0f} |"
        )
    print()
    print("| named case | outcome |")
    print("|---|---|")
    for name, result in named.items():
        print(f"| {name} | {result} |")
    for point, ok in killed.items():
        print(f"| kill during the {point} write | {'survived, exact' if ok else 'NOT survived'} |")
    if args.json:
        args.json.write_text(json.dumps({"fuzz": dict(fuzzed), "named": named, "kills": killed}, indent=2))


if __name__ == "__main__":
    main()
