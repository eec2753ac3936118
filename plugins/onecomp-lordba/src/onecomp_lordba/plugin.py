"""Entry point: formats ``lordba`` and ``lora``, the refiner ``lordba``, and the hook that puts a
stage's adapters into its checkpoint directory."""

from pathlib import Path

from onecomp import hookimpl
from onecomp.checkpoint.adapters import MANIFEST, add_to_checkpoint

from .formats import LoRAFormat, LoRDBAFormat
from .refiner import LoRDBA


@hookimpl
def register_formats(register):
    register(LoRDBAFormat)
    register(LoRAFormat)


@hookimpl
def register_refiners(register):
    register(LoRDBA)


@hookimpl
def on_checkpoint_written(run, checkpoint):
    """The refiner leaves its adapters in the stage's work directory (``<out>/.work/<stage>/adapters``);
    the stage's checkpoint carries them under ``adapters/lordba/``, listed and hashed in its manifest."""
    if run.out_dir is None:
        return
    source = Path(run.out_dir) / ".work" / Path(checkpoint.path).name / "adapters"
    if (source / MANIFEST).exists():
        add_to_checkpoint(checkpoint.path, source, "lordba")
