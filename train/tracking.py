"""Where a run's numbers go besides metrics.jsonl: TensorBoard, Weights & Biases, Trackio or MLflow
through accelerate's tracker classes (`--report-to`), and the clock behind each step line's ETA.

  python -m train --shards shards/ --report-to tensorboard,wandb      # tensorboard --logdir runs/train

`--report-to` takes transformers' `report_to` names, as the handbook's recipe does (`report_to: [wandb]`).
Rank 0 starts the trackers after setup with the resolved settings as the run's config, and logs every
metrics.jsonl record under transformers' names (train/loss, train/learning_rate, train/grad_norm, ...)
plus train/loss_per_source/NAME, train/tokens_per_s, train/mfu, ..., so a run of this trainer draws
next to a TRL run of the recipe. Projects: WANDB_PROJECT, TRACKIO_PROJECT and MLFLOW_EXPERIMENT_NAME,
else "midtrain"; wandb and MLflow name the run after the --output directory.

A resumed run (`--resume` from the checkpoint of step k) continues the same tracker run, which
OUTPUT/trackers.json names. Resume is exact, so a step logged again has the loss it had before:
  tensorboard  the same OUTPUT/tensorboard/; the new writer purges the stopped process's events of
               steps > k (TensorBoard's purge_step), so every step keeps one point
  wandb        the same run id (resume="allow"); wandb ignores a step below the run's last one, so the
               points the stopped process logged after k stay. Offline (WANDB_MODE=offline) wandb
               can't resume: it writes a second local run with the same id, which `wandb sync` joins
  trackio      the same run name (resume="allow"); steps the stopped process logged after k show twice
  mlflow       the same run id, with the params of its first start (MLflow refuses to change one);
               steps logged after k show twice
Each start gives the others the resolved settings again. A run that starts over (no checkpoint yet)
starts new tracker runs, and a new tensorboard/.
"""

import datetime
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

NAMES = ("tensorboard", "wandb", "trackio", "mlflow")
PROJECT = "midtrain"
IDS = "trackers.json"
TRANSFORMERS_NAMES = {"lr": "learning_rate"}  # metrics.jsonl key -> transformers' name of the same number
RUN_ID = {  # what continues a tracker's run, kept in OUTPUT/trackers.json
    "tensorboard": lambda tracker: tracker.logging_dir,
    "wandb": lambda tracker: tracker.run.id,
    "trackio": lambda tracker: tracker.run.name,
    "mlflow": lambda tracker: tracker.active_run.info.run_id,
}


def backends(report_to: str) -> list[str]:
    """The trackers --report-to names; one line naming the pip install for one that isn't installed."""
    names = [name.strip() for name in report_to.split(",") if name.strip()]
    if names in ([], ["none"]):
        return []
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_trackio_available, is_wandb_available

    installed = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available,
                 "trackio": is_trackio_available, "mlflow": is_mlflow_available}
    if names == ["all"]:
        names = [name for name in NAMES if installed[name]()]
        if not names:
            raise ValueError("--report-to all: none of tensorboard, wandb, trackio, mlflow is installed; "
                             "pip install 'midtrain[track]' (tensorboard, wandb, trackio) or pip install mlflow")
        return names
    unknown = [name for name in names if name not in NAMES]
    if unknown:
        raise ValueError(f"--report-to: {', '.join(unknown)} is not one of none, all, {', '.join(NAMES)}")
    missing = [name for name in names if not installed[name]()]
    if missing:
        raise ValueError(f"--report-to {','.join(missing)}: not installed; pip install {' '.join(missing)}")
    return list(dict.fromkeys(names))


def start_trackers(names: list[str], output: str, step: int, config: dict) -> list:
    """Rank 0: accelerate's trackers for `names`, given `config` as the run's config; at a resumed
    step > 0 they continue the tracker runs that OUTPUT/trackers.json names."""
    if not names:
        return []
    from accelerate import PartialState
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, TrackioTracker, WandBTracker

    # The trackers log through accelerate's process state and raise without one; it takes over the
    # process group that init_distributed made (and its device), and is not an Accelerator.
    PartialState()
    ids_file = Path(output) / IDS
    ids = json.loads(ids_file.read_text()) if step and ids_file.exists() else {}
    run_name = Path(output).resolve().name
    trackers = []
    for name in names:
        continuing = name in ids
        if name == "tensorboard":
            if not continuing:  # a run that starts over must not draw over the events of the one before
                shutil.rmtree(Path(output) / "tensorboard", ignore_errors=True)
            tracker = TensorBoardTracker("tensorboard", output, purge_step=step + 1)
        elif name == "wandb":
            tracker = WandBTracker(os.environ.get("WANDB_PROJECT", PROJECT), name=run_name, dir=output,
                                   id=ids.get("wandb"), resume="allow" if continuing else None)
        elif name == "trackio":
            tracker = TrackioTracker(os.environ.get("TRACKIO_PROJECT", PROJECT), name=ids.get("trackio"),
                                     resume="allow")
        else:
            tracker = MLflowTracker(PROJECT, run_id=ids.get("mlflow"), run_name=run_name)
        tracker.start()
        if not (continuing and name == "mlflow"):  # MLflow refuses to change a param its run has
            tracker.store_init_configuration(config)
        trackers.append(tracker)
    ids.update({tracker.name: RUN_ID[tracker.name](tracker) for tracker in trackers})
    tmp = ids_file.with_name(IDS + ".tmp")
    tmp.write_text(json.dumps(ids, indent=2) + "\n")
    os.replace(tmp, ids_file)
    return trackers


def log_metrics(trackers: list, record: dict) -> None:
    """One metrics.jsonl record to every tracker, at its step; the per-source losses as one value each."""
    values = {}
    for key, value in record.items():
        if isinstance(value, dict):
            values.update({f"train/{key}/{name}": v for name, v in value.items() if v is not None})
        elif value is not None and key != "step":
            values[f"train/{TRANSFORMERS_NAMES.get(key, key)}"] = value
    for tracker in trackers:
        tracker.log(values, step=record["step"])


def finish_trackers(trackers: list) -> None:
    for tracker in trackers:
        tracker.finish()


def read_metrics(run_dir) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl; a last line still being written by a live run is left out."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):  # only the last, unterminated line may be cut short
                raise ValueError(f"{run_dir}/metrics.jsonl: line {number} is not JSON") from None
    return records


@dataclass
class Clock:
    """Training time of the run across resumes, and the ETA at this process's own pace."""

    start_step: int
    earlier_s: float = 0.0  # trained by the processes before a resume
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def resumed(cls, output: str, step: int) -> "Clock":
        """At a resumed step, the clock goes on from the elapsed_s of metrics.jsonl's last line (the
        trainer has cut it back to that step); with --log-every above the step, there is none yet."""
        records = read_metrics(output) if step and (Path(output) / "metrics.jsonl").exists() else []
        return cls(step, records[-1]["elapsed_s"] if records else 0.0)

    def elapsed(self) -> float:
        return self.earlier_s + time.perf_counter() - self.started

    def eta(self, step: int, total_steps: int) -> float:
        return (time.perf_counter() - self.started) / (step - self.start_step) * (total_steps - step)


def hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))
