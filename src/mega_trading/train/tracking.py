"""Experiment tracking: MLflow in a SQLite file inside the run folder, or nothing.

No server is involved: the store is `sqlite:///RUN/mlruns.db` and artifacts go under
`RUN/mlartifacts`, so a run folder carries its own tracking history. Browse it with::

    mlflow ui --backend-store-uri sqlite:///RUN/mlruns.db

MLflow is imported only when a tracker is opened (it is slow to import), and the trainer
talks to it through `MlflowClient` with an explicit URI, so no global MLflow state (or a
`MLFLOW_TRACKING_URI` in the environment) can send a run elsewhere.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mega_trading.core.errors import ConfigError
from mega_trading.core.lineage import read_json, write_json_atomic

EXPERIMENT = "mega-trading"
TRACKING_FILE = "tracking.json"  # remembers the MLflow run id so a resumed run continues it


def tracking_uri(run_dir: str | Path) -> str:
    return f"sqlite:///{(Path(run_dir) / 'mlruns.db').resolve()}"


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{'model': {'n_layer': 2}} -> {'model.n_layer': '2'} (MLflow params are strings)."""
    flat: dict[str, str] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = str(value)
    return flat


class Tracker:
    """The no-op tracker (`--tracking none`); MlflowTracker has the same interface."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


class MlflowTracker(Tracker):
    def __init__(self, run_dir: str | Path, run_name: str | None = None, resume: bool = False):
        from mlflow.tracking import MlflowClient

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.uri = tracking_uri(self.run_dir)
        self.client = MlflowClient(tracking_uri=self.uri)
        remembered = self.run_dir / TRACKING_FILE
        if resume and remembered.is_file():
            self.run_id = read_json(remembered)["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        if experiment is None:
            artifacts = (self.run_dir / "mlartifacts").resolve().as_uri()
            experiment_id = self.client.create_experiment(EXPERIMENT, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        run = self.client.create_run(experiment_id, run_name=run_name or self.run_dir.name)
        self.run_id = run.info.run_id
        write_json_atomic(remembered, {"backend": "mlflow", "tracking_uri": self.uri,
                                       "experiment_id": experiment_id, "run_id": self.run_id})

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in flatten(params).items()]
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)
                 and math.isfinite(float(v))]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: str | Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def open_tracker(kind: str, run_dir: str | Path, run_name: str | None = None,
                 resume: bool = False) -> Tracker:
    """'mlflow' -> MlflowTracker on RUN/mlruns.db; 'none' -> a tracker that does nothing."""
    if kind == "none":
        return Tracker()
    if kind == "mlflow":
        return MlflowTracker(run_dir, run_name=run_name, resume=resume)
    raise ConfigError(f"unknown tracking backend {kind!r}; use 'mlflow' or 'none'")
