"""Sweep state on disk: what a resumed sweep needs to find its parent run and its Tune experiment.

Written under ``<storage>/sweeps/<sweep name>/`` when a sweep starts and updated when it ends, so a
driver that was killed can be resumed from any machine that sees the storage path.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dinoscale.errors import UserError


class ResumeError(UserError, RuntimeError):
    """No sweep to resume, or not the same spec."""

    kind = "resume"


@dataclass
class SweepState:
    sweep_id: str
    spec_name: str
    spec_digest: str
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    tune_path: str
    status: str = "running"  # running | finished | failed
    started: float = 0.0
    attempts: int = 1  # driver runs: 1 + number of resumes

    @staticmethod
    def folder(storage: Path, spec_name: str) -> Path:
        return Path(storage) / "sweeps" / spec_name

    def save(self, storage: Path) -> None:
        d = self.folder(storage, self.spec_name)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{self.sweep_id}.json.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, d / f"{self.sweep_id}.json")
        tmp_latest = d / ".latest.tmp"
        tmp_latest.write_text(self.sweep_id)
        os.replace(tmp_latest, d / "latest")

    @classmethod
    def load_latest(cls, storage: Path, spec_name: str) -> SweepState | None:
        d = cls.folder(storage, spec_name)
        if not (d / "latest").is_file():
            return None
        return cls(**json.loads((d / f"{(d / 'latest').read_text().strip()}.json").read_text()))

    @classmethod
    def for_resume(cls, storage: Path, spec_name: str, spec_digest: str) -> SweepState:
        state = cls.load_latest(storage, spec_name)
        if state is None:
            raise ResumeError(
                f"no sweep named '{spec_name}' to resume under {cls.folder(storage, spec_name)}; "
                "start it without --resume"
            )
        if state.spec_digest != spec_digest:
            raise ResumeError(
                f"the spec of '{spec_name}' changed since sweep {state.sweep_id} started (digest {state.spec_digest} -> "
                f"{spec_digest}); a resume must use the same spec. Start a new sweep instead (without --resume)."
            )
        if state.status == "finished":
            raise ResumeError(
                f"sweep {state.sweep_id} already finished; nothing to resume (start a new sweep without --resume)"
            )
        state.attempts += 1
        state.status = "running"
        return state


def new_sweep_id(spec_name: str) -> str:
    return f"{spec_name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid() % 10000:04d}"
