"""Experiment trackers (--logger): TensorBoard, Weights & Biases and MLflow, opened for a run directory
with the run's flags as their config, given scalars at a step, closed. Rank 0 alone logs. A resumed run
continues the same W&B and MLflow runs: their ids are kept in <out>/trackers.json. Importing this module
loads no tracker (nor torch): each is imported when a run opens it."""
import json
import os

from common import errors
from common.errors import UserError

# --logger's choices, and the module each imports (cli.parse_args requires them before the run directory)
MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
IDS = "trackers.json"  # the W&B and MLflow run ids of the run in this directory


def chosen(logger=(), tensorboard=False):
    """The trackers of --logger, with --tensorboard being --logger tensorboard; each once, in order."""
    names = list(logger or ()) + (["tensorboard"] if tensorboard else [])
    return list(dict.fromkeys(names))


def _saved_ids(out):
    try:
        with open(os.path.join(out, IDS)) as f:
            ids = json.load(f)
        return ids if isinstance(ids, dict) else {}
    except (OSError, ValueError):  # none yet, or not ours to read: new tracker runs
        return {}


def _save_ids(out, ids):
    from common import rundir
    rundir.atomic_write_text(os.path.join(out, IDS), json.dumps(ids, indent=1, sort_keys=True))


def _first_line(e):
    text = str(e).strip()
    return text.splitlines()[0].rstrip(".") if text else type(e).__name__


def _tensorboard(out):
    return errors.require(MODULES["tensorboard"], "--logger tensorboard").SummaryWriter(os.path.join(out, "tensorboard"))


def _wandb(out, config, run_id):
    """A W&B run: project $WANDB_PROJECT or medssl, named after the run directory, its files in <out>/wandb
    (or $WANDB_DIR); resume="allow" continues `run_id`. WANDB_MODE=offline logs to those files alone
    (`wandb sync` uploads them later)."""
    wandb = errors.require("wandb", "--logger wandb")
    try:
        return wandb.init(project=os.environ.get("WANDB_PROJECT") or "medssl",
                          name=os.path.basename(os.path.abspath(out)), dir=None if os.environ.get("WANDB_DIR") else out,
                          config=config, id=run_id, resume="allow")
    except (wandb.errors.Error, OSError, ValueError) as e:
        raise UserError(f"--logger wandb: {_first_line(e)}; run `wandb login`, or set WANDB_MODE=offline to log "
                        f"into {out}/wandb alone")


def mlflow_uri(out):
    """$MLFLOW_TRACKING_URI, else a file store in <out>/mlruns (`mlflow ui --backend-store-uri <out>/mlruns`)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or "file:" + os.path.join(os.path.abspath(out), "mlruns")


def _mlflow(out, config, run_id):
    """An MLflow client and run id: the run `run_id` where the tracking store still has it, else a new run
    in experiment $MLFLOW_EXPERIMENT_NAME or medssl, named after the run directory, the flags its params."""
    errors.require("mlflow", "--logger mlflow")
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    uri = mlflow_uri(out)
    if uri.startswith("file:") and not os.environ.get("MLFLOW_TRACKING_URI"):
        # MLflow 3 keeps its file store for those who ask for it; the run directory's own store is ours
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    try:
        client = MlflowClient(uri)
        if run_id:
            try:
                client.update_run(run_id, status="RUNNING")
                return client, run_id
            except MlflowException:  # another store than the run's: a new run
                pass
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "medssl"
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
        run_id = client.create_run(experiment_id, run_name=os.path.basename(os.path.abspath(out))).info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in sorted(config.items())]  # MLflow's limit of a value
        for i in range(0, len(params), 100):  # and of a batch
            client.log_batch(run_id, params=params[i:i + 100])
        return client, run_id
    except MlflowException as e:
        raise UserError(f"--logger mlflow: {_first_line(e)} (tracking URI {uri}); set "
                        f"MLFLOW_TRACKING_URI to a store you can write, or unset it to log into {out}/mlruns")


def open_trackers(names, out, config):
    """The trackers `names` (--logger) opened for the run directory `out` with `config` (the run's flags,
    plain values) as their config: a list of (name, handle), empty on ranks other than 0."""
    if not names or os.environ.get("RANK", "0") != "0":
        return []
    ids, trackers = _saved_ids(out), []
    for name in names:
        if name == "tensorboard":
            trackers.append((name, _tensorboard(out)))
        elif name == "wandb":
            run = _wandb(out, config, ids.get("wandb"))
            ids["wandb"] = run.id
            trackers.append((name, {"run": run, "axes": set()}))
        elif name == "mlflow":
            client, run_id = _mlflow(out, config, ids.get("mlflow"))
            ids["mlflow"] = run_id
            trackers.append((name, (client, run_id)))
        else:
            raise ValueError(f"unknown tracker {name!r}; known: {', '.join(MODULES)}")
    if {"wandb", "mlflow"} & set(names):
        _save_ids(out, ids)
    return trackers


def log(trackers, scalars, step, axis="step"):
    """Log the numbers of `scalars` ({tag: value}, tags like "epoch/loss" or "seed0/val_auc") at `step` of
    the x-axis `axis` ("step" or "epoch"): TensorBoard's and MLflow's step; in W&B, whose own step only
    grows, a metric `axis` logged beside them that their prefix's charts plot against."""
    values = {k: float(v) for k, v in scalars.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if not values:
        return
    for name, handle in trackers:
        if name == "tensorboard":
            for key, value in values.items():
                handle.add_scalar(key, value, step)
        elif name == "wandb":
            for prefix in {key.split("/")[0] for key in values} - handle["axes"]:
                handle["run"].define_metric(f"{prefix}/*", step_metric=axis)
                handle["axes"].add(prefix)
            handle["run"].log({axis: step, **values})
        elif name == "mlflow":
            import time

            from mlflow.entities import Metric
            client, run_id = handle
            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(key, value, now, step) for key, value in values.items()])


def flush(trackers):
    for name, handle in trackers:
        if name == "tensorboard":
            handle.flush()


def close(trackers, preempted=False):
    """Close the trackers; `preempted`: the run stops to be resumed (W&B marks it preempting, MLflow
    KILLED), the next launch continues the same tracker runs."""
    for name, handle in trackers:
        if name == "tensorboard":
            handle.close()
        elif name == "wandb":
            if preempted:
                handle["run"].mark_preempting()
            handle["run"].finish(exit_code=1 if preempted else 0)
        elif name == "mlflow":
            client, run_id = handle
            client.set_terminated(run_id, "KILLED" if preempted else "FINISHED")
