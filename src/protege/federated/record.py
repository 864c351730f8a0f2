"""What a federation run writes: ``runs/<name>/`` with

- ``config.yaml``: the resolved config;
- ``metrics.jsonl``: one line per client per round (``"kind": "client"``: local and global
  accuracy, losses), one per round (``"kind": "round"``: ALMA, global accuracy where a global
  model exists, wall time, bytes up/down), and one per rejected or missing reply
  (``"kind": "rejected"``) or server note (``"kind": "note"``, e.g. KnFu's weight matrix);
- ``summary.json``: the final ALMA, global accuracy, per-round series and counts;
- ``rounds.png``: ALMA, mean global accuracy and each client's local accuracy per round.

ALMA (average local model accuracy, KnFu paper) is the mean over the clients that answered of
each client's accuracy on its own test set, drawn from its own distribution.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import yaml

from ..files import atomic_write_text
from .config import FederationConfig

log = logging.getLogger("protege.federated")


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


class Recorder:
    """Writes the run directory of one federation (a context manager: the metrics file is closed at exit)."""

    def __init__(self, cfg: FederationConfig) -> None:
        self.cfg = cfg
        self.dir = cfg.run_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            self.dir / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
        )
        (self.dir / "summary.json").unlink(missing_ok=True)  # a summary only ever describes a finished run
        self._file: IO[str] = open(self.dir / "metrics.jsonl", "w")  # noqa: SIM115 (closed in __exit__)
        self.rounds: list[dict[str, Any]] = []
        self.clients: list[dict[str, Any]] = []
        self.rejections: list[dict[str, Any]] = []

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._file.close()

    def _write(self, line: dict[str, Any]) -> None:
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()

    def rejected(self, rnd: int, step: str, node: int, client: int | None, reason: str) -> None:
        """Log a reply left out of ``step`` of round ``rnd`` (``client`` unknown until it first answers)."""
        line = {
            "kind": "rejected",
            "round": rnd,
            "step": step,
            "node": node,
            "client": client,
            "reason": reason,
        }
        log.warning(
            "round %d, %s: reply of node %s (client %s) rejected: %s", rnd, step, node, client, reason
        )
        self.rejections.append(line)
        self._write(line)

    def rejections_of(self, rnd: int, step: str) -> list[dict[str, Any]]:
        return [r for r in self.rejections if r["round"] == rnd and r["step"] == step]

    def note(self, rnd: int, text: str, **extra: Any) -> None:
        self._write({"kind": "note", "round": rnd, "note": text, **extra})

    def round(
        self,
        rnd: int,
        per_client: dict[int, dict[str, Any]],
        server: dict[str, float],
        seconds: float,
        bytes_up: int,
        bytes_down: int,
        trained: list[int],
    ) -> None:
        """Record round ``rnd``: each client's metrics and the round's aggregates."""
        for pid in sorted(per_client):
            line = {"kind": "client", "round": rnd, "client": pid, "model": self.cfg.model_of(pid)}
            line.update({k: v for k, v in per_client[pid].items() if k != "partition_id"})
            self.clients.append(line)
            self._write(line)
        global_accs = [v for k, v in server.items() if k.startswith("global_acc:")]
        line = {
            "kind": "round",
            "round": rnd,
            "alma": _mean([m.get("acc_local", math.nan) for m in per_client.values()]),
            "mean_client_global_acc": _mean([m.get("acc_global", math.nan) for m in per_client.values()]),
            "global_acc": _mean(global_accs),
            "evaluated": len(per_client),
            "trained": trained,
            "seconds": seconds,
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
            **server,
        }
        self.rounds.append(line)
        self._write(line)

    def finish(self) -> dict[str, Any]:
        """Write ``summary.json`` and ``rounds.png``; the summary."""
        last = self.rounds[-1] if self.rounds else {}
        summary = {
            "name": self.cfg.name,
            "strategy": self.cfg.strategy.name,
            "dataset": self.cfg.dataset,
            "clients": self.cfg.clients,
            "models": self.cfg.models,
            "partition": self.cfg.partition.model_dump(mode="json"),
            "rounds": len(self.rounds),
            "alma": last.get("alma"),
            "global_acc": last.get("global_acc"),
            "mean_client_global_acc": last.get("mean_client_global_acc"),
            "final_local_acc": {
                str(c["client"]): c.get("acc_local") for c in self.clients if c["round"] == last.get("round")
            },
            "alma_per_round": [r["alma"] for r in self.rounds],
            "global_acc_per_round": [r["global_acc"] for r in self.rounds],
            "seconds_per_round": _mean([r["seconds"] for r in self.rounds]),
            "bytes_up_per_round": _mean([r["bytes_up"] for r in self.rounds]),
            "bytes_down_per_round": _mean([r["bytes_down"] for r in self.rounds]),
            "rejected": len(self.rejections),
        }
        self._plot()
        atomic_write_text(self.dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary

    def _plot(self) -> None:
        from ..analysis.html import pyplot

        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 4))
        try:
            by_client: dict[int, list[tuple[int, float]]] = {}
            for c in self.clients:
                if c.get("acc_local") is not None:
                    by_client.setdefault(c["client"], []).append((c["round"], c["acc_local"]))
            for i, (_, pts) in enumerate(sorted(by_client.items())):
                ax.plot(*zip(*pts), color="0.75", lw=0.8, label="client local acc" if i == 0 else None)
            rounds = [r["round"] for r in self.rounds]
            for key, label in (
                ("alma", "ALMA"),
                ("mean_client_global_acc", "mean client global acc"),
                ("global_acc", "global model acc"),
            ):
                ys = [r[key] for r in self.rounds]
                if any(y is not None for y in ys):
                    ax.plot(rounds, [math.nan if y is None else y for y in ys], marker="o", label=label)
            ax.set(xlabel="round", ylabel="accuracy", title=f"{self.cfg.name}: {self.cfg.strategy.name}")
            ax.legend(fontsize=8)
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        finally:
            plt.close(fig)
        path = self.dir / "rounds.png"
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".rounds.png.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(buffer.getvalue())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
