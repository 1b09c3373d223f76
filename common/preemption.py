"""Preemption: a cluster's warning that a job is about to end. SLURM sends the signal of `--signal=USR1@120`
that long before the time limit, and SIGTERM before the SIGKILL of a cancel, a preemption or a time limit
(KillWait, 30 s by default). cli.run_main installs these handlers in every script.

- SIGUSR1: a pretraining run finishes the optimiser step it is in, writes the checkpoint the periodic save
  writes (the mid-epoch position included) and exits with EXIT_PREEMPTED; under SLURM (SLURM_JOB_ID set)
  rank 0 first requeues the job (`scontrol requeue`), whose same command then resumes the run. Elsewhere
  in a script (evaluate.py between its saved seeds, a pretraining run before its first step) it stops at
  once, keeping what is saved, with the same exit code and requeue.
- SIGTERM under SLURM: the same checkpoint at the step's end, but no requeue (scancel sends it too; a
  preemption with PreemptMode=REQUEUE is requeued by SLURM itself); exit code 143, as elsewhere, where
  SIGTERM stops at once (cli.run_main).
A second signal stops the process at once. Under torchrun the ranks agree on the step to stop at (every
log step, pretrain.train's log_every), since each gets the signal at its own moment."""
import os
import signal
import subprocess

EXIT_PREEMPTED = 75  # sysexits.h's EX_TEMPFAIL: stopped to be resumed, by SLURM's requeue or the same command


class Preempted(KeyboardInterrupt):
    """The run stopped for SIGUSR1, its checkpoint (or what it finished) saved; args[0] is the signal."""


_state = {"signal": None, "deferring": False, "requeued": False}


def under_slurm():
    return bool(os.environ.get("SLURM_JOB_ID"))


def _stop_now(signum):
    signal.signal(signum, signal.SIG_DFL)  # a further signal ends the process at once
    if signum == signal.SIGUSR1:
        raise Preempted(signum)
    raise KeyboardInterrupt(signum)  # cli.run_main: the interrupted line, exit code 143


def _on_signal(signum, frame):
    if _state["deferring"] and _state["signal"] is None:
        _state["signal"] = signum  # the training loop stops at the end of its step (requested)
        return
    _stop_now(signum)


def install():
    """Answer SIGUSR1, and SIGTERM under SLURM, as this module says; a new script's state (cli.run_main)."""
    _state.update(signal=None, deferring=False, requeued=False)
    signal.signal(signal.SIGUSR1, _on_signal)
    if under_slurm():
        signal.signal(signal.SIGTERM, _on_signal)


def defer():
    """From here on (a training loop) the signals above are answered by `requested` at a step's end."""
    _state["deferring"] = True


def requested(device=None):
    """The signal that asks the run to stop, or None. Under torchrun every rank must call it at the same
    steps: a collective that stops every rank when one got the signal (`device`: the run's, for NCCL)."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return _state["signal"]
    import torch
    flag = torch.tensor([_state["signal"] or 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() and _state["signal"] is None:
        _state["signal"] = int(flag.item())
    return _state["signal"]


def stop():
    """Stop for the requested signal, its checkpoint written: Preempted for SIGUSR1, an interrupt for SIGTERM."""
    signum = _state["signal"]
    _stop_now(signum if signum is not None else signal.SIGUSR1)


def requeue():
    """Under SLURM, on rank 0, once: `scontrol requeue $SLURM_JOB_ID`; returns the words that end the
    stopped run's line (what happens next), or "" where nothing was requeued."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return ""
    if os.environ.get("RANK", "0") != "0":
        return ""
    if _state["requeued"]:
        return f"; SLURM job {job} is requeued to run it again"
    _state["requeued"] = True
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        why = (done.stderr or done.stdout).strip().splitlines()[-1:] if done.returncode else None
    except (OSError, subprocess.SubprocessError) as e:
        why = [str(e)]
    if why is not None:
        return f"; `scontrol requeue {job}` failed ({why[0] if why else 'no message'}): submit the job again"
    return f"; SLURM job {job} is requeued to run it again"
