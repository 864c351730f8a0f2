"""README.md's "A five-minute tour" runs as written, in order, in a fresh directory.

The test reads the tour section (from ``## A five-minute tour`` to the next ``## `` heading), takes
every line of its ```bash blocks (comment-only lines aside; a trailing comment is dropped by
``shlex``) and every ```python block not marked ``# illustrative``, and runs them in the README's
order in a temporary directory holding a link to ``configs/``, so ``runs/`` lands there:
``protege ARGS`` as ``python -m protege.cli ARGS`` with the interpreter running the tests,
consecutive Python blocks as one script (they share their names, as in one session), each step a
process of its own that must exit with status 0. What the test adds to a command leaves its
meaning alone: ``SMALL`` appends fewer epochs (or candidates, or new tokens), and the
placeholders ``DIR`` and ``FILE.txt`` are filled with a tiny random LLaMA and a text file.
``SKIP`` lists the lines not run, each with its reason; the config files they name must exist.
PROTEGE_SLOW=1 also runs the federation line, and starts every step as a new
``sys.executable`` process instead of a fork (see ``_PARENT``). The README says the tour runs
after ``make demo``; the demo's run (``protege quickstart``) is tests/test_quickstart.py's, and
nothing in the tour reads it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TOUR = "## A five-minute tour"
SLOW = os.environ.get("PROTEGE_SLOW") == "1"

_FAST = ["--set", "epochs=1", "--set", "progress=false"]
#: appended by subcommand: the same command, on a smaller budget
SMALL: dict[str, list[str]] = {
    "train": _FAST,
    "distill": _FAST,
    "analyze gradvar": [*_FAST, "--batches", "8"],
    "search": ["--set", "budget.max_candidates=4", "--set", "progress=false"],
    "generate": ["--set", "max_new_tokens=4"],
    "federate": [
        *("--set", "clients=2", "--set", "rounds=1", "--set", "partition.samples_per_client=100"),
        *("--set", "transfer_size=100", "--set", "global_test_size=200"),
    ],
}
#: appended when the command reads this config (on top of SMALL)
SMALL_CONFIG: dict[str, list[str]] = {
    "configs/lm-tiny.yaml": ["--set", "data.options.block_size=16", "--set", "measure_cost=false"],
}
#: lines of the tour that are not run, and why (a line is the command without its comment)
SKIP: dict[str, str] = {
    "source .venv/bin/activate": "the test runs protege with the interpreter that runs the tests",
}
if not SLOW:
    SKIP["protege federate configs/fed-knfu.yaml"] = (
        "Flower's simulation engine starts Ray: ~35 s even for 2 clients and 1 round; "
        "tests/test_federated_apps.py runs a simulation; PROTEGE_SLOW=1 runs this line too"
    )


def tour_section(text: str) -> str:
    assert TOUR in text, f"README.md has no {TOUR!r} section"
    return re.split(r"^## ", text.split(TOUR, 1)[1], flags=re.M)[0]


def fenced_blocks(section: str) -> list[tuple[str, str]]:
    """``(language, body)`` of each fenced block, in order."""
    return re.findall(r"^```(\w*)\n(.*?)^```", section, flags=re.S | re.M)


def tour_steps(text: str) -> list[tuple[str, str | list[str]]]:
    """``("shell", argv)`` per command line and ``("python", script)`` per run of Python blocks."""
    steps: list[tuple[str, str | list[str]]] = []
    for lang, body in fenced_blocks(tour_section(text)):
        if lang == "bash":
            for line in body.replace("\\\n", " ").splitlines():
                argv = shlex.split(line, comments=True)
                if argv:
                    steps.append(("shell", argv))
        elif lang == "python" and not body.lstrip().startswith("# illustrative"):
            if steps and steps[-1][0] == "python":
                steps[-1] = ("python", f"{steps[-1][1]}\n{body}")
            else:
                steps.append(("python", body))
    return steps


def tiny_llama(root: Path) -> tuple[Path, Path]:
    """A random 2-layer LLaMA with a word-level tokenizer (and a chat template), and a text file."""
    import pydoc_data.topics

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    text = " ".join(list(pydoc_data.topics.topics.values())[:20])
    corpus = root / "corpus.txt"
    corpus.write_text(text[:8000])
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<unk>", "<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
    lines = [line for line in text.splitlines() if line.strip()]
    tok.train_from_iterator(lines, trainers.WordLevelTrainer(vocab_size=120, special_tokens=specials))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' </s> ' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    model_dir = root / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    fast.save_pretrained(model_dir)
    return model_dir, corpus


def _arguments(argv: list[str], placeholders: dict[str, str]) -> list[str]:
    """The arguments after ``protege``: placeholders filled, ``SMALL`` settings appended."""
    assert argv[0] == "protege", f"the tour's commands are protege commands, got: {shlex.join(argv)}"
    args = argv[1:]
    for i, arg in enumerate(args):
        key, sep, value = arg.partition("=")
        if sep and value in placeholders:
            args[i] = f"{key}={placeholders[value]}"
    left = [a for a in args if re.fullmatch(r"(\w+(\.\w+)*=)?[A-Z]+(\.txt)?", a)]
    assert not left, f"placeholders the test does not fill: {left} in {shlex.join(argv)}"
    sub = " ".join(args[:2]) if args[0] == "analyze" else args[0]
    extra = SMALL.get(sub, []) + [x for a in args for x in SMALL_CONFIG.get(a, [])]
    return [*args, *extra]


#: The steps' parent (unless PROTEGE_SLOW=1). ``python -m protege.cli`` spends ~4 s importing
#: protege before it reads its arguments, longer than most steps of the tour take: 17 steps, over
#: a minute of imports on two cores. This interpreter (the one running the tests) imports protege
#: once; each step then runs in a fork of it, a process of its own, exactly as
#: ``python -m protege.cli ARGS`` (runpy, as ``-m`` does) or ``python SCRIPT`` runs it, with its
#: output in a log file and its exit status sent back (a step over its time is killed by SIGALRM).
_PARENT = """\
import atexit, json, os, runpy, signal, sys, threading, traceback
import protege
assert threading.active_count() == 1, "no thread may run when the steps fork"
for line in sys.stdin:
    step = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        signal.alarm(step["timeout"])
        log = os.open(step["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(log, 1); os.dup2(log, 2); os.close(log)
        code = 1
        try:
            sys.argv = step["argv"]
            if sys.argv[:2] == ["-m", "protege.cli"]:
                sys.argv = sys.argv[1:]
                runpy.run_module("protege.cli", run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(sys.argv[0], run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:
            atexit._run_exitfuncs()
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""
TIMEOUT = 300  # seconds a step may take


class Steps:
    """Runs ``python ARGV`` for each step of the tour, in a process of its own: a fork of one
    interpreter that imported protege, or (PROTEGE_SLOW=1) a new ``sys.executable`` process."""

    def __init__(self, cwd: Path, env: dict[str, str], logs: Path, fork: bool = True) -> None:
        self.cwd, self.env, self.logs = cwd, env, logs
        logs.mkdir()
        self.parent = None
        if fork:
            self.parent = subprocess.Popen(
                [sys.executable, "-c", _PARENT],
                cwd=cwd,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=(logs / "parent.log").open("w"),
                text=True,
            )
        self.count = 0

    def run(self, argv: list[str], what: str) -> str:
        """``argv``: what follows ``python``; the step's output, after it exited with status 0."""
        self.count += 1
        log = self.logs / f"{self.count:02d}.log"
        if self.parent is None:
            with log.open("w") as out:
                try:
                    code = subprocess.run(
                        [sys.executable, *argv],
                        cwd=self.cwd,
                        env=self.env,
                        stdout=out,
                        stderr=out,
                        timeout=TIMEOUT,
                    ).returncode
                except subprocess.TimeoutExpired:
                    code = -signal.SIGALRM
        else:
            assert self.parent.stdin is not None and self.parent.stdout is not None
            self.parent.stdin.write(json.dumps({"argv": argv, "log": str(log), "timeout": TIMEOUT}) + "\n")
            self.parent.stdin.flush()
            reply = self.parent.stdout.readline()
            assert reply, f"the steps' parent died: {(self.logs / 'parent.log').read_text()[-4000:]}"
            code = int(reply)
        output = log.read_text()
        assert code != -signal.SIGALRM, f"README tour step ran over {TIMEOUT} s: {what}\n{output[-4000:]}"
        assert code == 0, f"README tour step failed (exit {code}): {what}\n{output[-4000:]}"
        return output

    def close(self) -> None:
        if self.parent is not None:
            self.parent.communicate("", timeout=60)


def test_the_tour_runs_as_written(tmp_path: Path) -> None:
    steps = tour_steps(README.read_text())
    lines = [" ".join(s) for kind, s in steps if kind == "shell"]
    assert sum(line.startswith("protege ") for line in lines) >= 15, lines  # the parse found the tour
    assert set(SKIP) <= set(lines), f"SKIP names lines the tour no longer has: {set(SKIP) - set(lines)}"

    work = tmp_path / "clone"
    work.mkdir()
    (work / "configs").symlink_to(ROOT / "configs", target_is_directory=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    runner = Steps(work, env, tmp_path / "logs", fork=not SLOW and hasattr(os, "fork"))
    outputs: dict[str, str] = {}
    try:
        model_dir, corpus = tiny_llama(tmp_path)
        placeholders = {"DIR": str(model_dir), "FILE.txt": str(corpus)}
        for kind, step in steps:
            if kind == "python":
                script = work / "snippets.py"
                script.write_text(str(step))
                outputs["python"] = runner.run([str(script)], f"the Python snippets:\n{step}")
                continue
            line = " ".join(step)
            if line in SKIP:
                for arg in step:  # a line not run still names files that exist
                    if arg.endswith((".yaml", ".yml")):
                        assert (work / arg).is_file(), f"{line}: {arg} does not exist"
                continue
            outputs[line] = runner.run(["-m", "protege.cli", *_arguments(list(step), placeholders)], line)
    finally:
        runner.close()

    # what the tour's comments promise
    runs = work / "runs"
    assert "python" in outputs and (runs / "my-kd" / "summary.json").is_file()
    resumed = [out for line, out in outputs.items() if "--resume" in line]
    assert resumed and all("nothing to resume" in out for out in resumed)
    assert (runs / "compare.html").is_file() and (runs / "digits-kd" / "report.html").is_file()
    baseline = json.loads((runs / "digits-baseline" / "summary.json").read_text())
    assert baseline["mode"] == "train"


def test_the_tour_yaml_is_the_config_it_names() -> None:
    """The run YAML shown in the tour is configs/digits-kd.yaml (comments aside)."""
    shown = [body for lang, body in fenced_blocks(tour_section(README.read_text())) if lang == "yaml"]
    assert len(shown) == 1
    assert yaml.safe_load(shown[0]) == yaml.safe_load((ROOT / "configs" / "digits-kd.yaml").read_text())


@pytest.mark.parametrize(
    ("markdown", "expected"),
    [
        (
            "## A five-minute tour\n```bash\n# only a comment\nprotege a b  # says\n"
            "protege c \\\n  d 'e*'\n```\n```python\nx = 1\n```\n```python\ny = x\n```\n"
            "```python\n# illustrative\nz\n```\n## Next\n```bash\nprotege never\n```\n",
            [
                ("shell", ["protege", "a", "b"]),
                ("shell", ["protege", "c", "d", "e*"]),
                ("python", "x = 1\n\ny = x\n"),
            ],
        ),
    ],
)
def test_tour_steps_parse(markdown: str, expected: list) -> None:
    assert tour_steps(markdown) == expected
