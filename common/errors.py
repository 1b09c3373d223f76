"""What a user is told when something goes wrong: the error that becomes one line and exit code 2, and
where a run is when it is interrupted. The bottom of common/: it imports nothing of the project, so every
module can raise and report without an import cycle."""
import importlib
import os


class UserError(Exception):
    """Bad input the user can fix: printed as one line, exit code 2, no traceback."""


def escape(value):
    """Text that may come from a file (a path, a key, a checkpoint's metadata) safe to print on one
    line: control characters, terminal escape sequences and line breaks among them, are shown as
    \\x1b, \\n, ..., never obeyed by the terminal."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(value))


class Progress:
    """Where the running script is, for the line printed when it is interrupted. Loops call
    `progress.update(epoch=..., step=...)` (and seed=... where there are seeds); rundir sets `out`
    (prepare_run_dir), `checkpoint` (save_checkpoint, or the one a resumed run found) and
    `overwrite`."""

    FIELDS = ("out", "seed", "epoch", "step", "checkpoint", "overwrite")

    def __init__(self):
        self.reset()

    def reset(self):
        for name in self.FIELDS:
            setattr(self, name, None)

    def update(self, **fields):
        unknown = set(fields) - set(self.FIELDS)
        if unknown:
            raise TypeError(f"progress has no field {sorted(unknown)[0]!r}; fields: {', '.join(self.FIELDS)}")
        for name, value in fields.items():
            setattr(self, name, value)

    def interrupted_message(self, verb="interrupted"):
        """Where the run stopped and what of it is kept; `verb` ("interrupted", "stopped") starts it."""
        where = ", ".join(f"{name} {getattr(self, name)}" for name in ("seed", "epoch", "step")
                          if getattr(self, name) is not None)
        if self.out is None:
            return f"{verb} before the run directory was set up; nothing was written"
        at = f"{verb} at {where}" if where else f"{verb} before training started"
        # a signal between a checkpoint's rename and its record here: the file on disk is whole (atomic)
        checkpoint = self.checkpoint or os.path.join(self.out, "checkpoint.pt")
        if os.path.isfile(checkpoint):
            at = at if self.checkpoint or where else verb
            again = "the same command without --overwrite" if self.overwrite else "the same command"
            return (f"{at}; the checkpoint in {os.path.dirname(checkpoint) or '.'} is kept; "
                    f"run {again} again to resume")
        return f"{at}; no checkpoint was written yet, so nothing of this run is kept in {self.out}"


progress = Progress()

class ReportedElsewhere(Exception):
    """Raised on the other ranks when one rank failed in a step they share (dist.on_main): that rank
    prints the line, these exit with code 2 in silence."""


# the pip names of the modules this project imports only where a feature needs them
PIP_NAMES = {"torch.utils.tensorboard": "tensorboard", "tensorboard": "tensorboard", "captum": "captum",
             "transformers": "transformers", "safetensors": "safetensors", "pydicom": "pydicom",
             "tifffile": "tifffile", "umap": "umap-learn", "sklearn": "scikit-learn", "PIL": "Pillow",
             "yaml": "pyyaml", "skimage": "scikit-image", "cv2": "opencv-python", "wandb": "wandb",
             "mlflow": "mlflow-skinny"}


def pip_name(module):
    """The package that provides `module` (its top-level name, unless PIP_NAMES says otherwise)."""
    return PIP_NAMES.get(module, PIP_NAMES.get(module.split(".")[0], module.split(".")[0]))


def require(module, feature):
    """Import an optional dependency, or raise a UserError naming the package to install: called
    where a flag turns the feature on, before anything is written."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package = pip_name(module)
        raise UserError(f"{feature} needs the package {package}, which is not installed or does not import "
                        f"({e}); pip install {package}, or run without {feature}")
