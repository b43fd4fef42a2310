"""torchrun worker of tests/test_train_fsdp.py: several trainer runs in one launch (each launch
costs seconds of start-up per process), run in order from a JSON list of jobs
``{"argv": [...], "kill_at": step}``.

``kill_at`` kills every process on the spot (``os._exit``; it must be the last job) in the middle
of writing sharded ``checkpoint-<kill_at>``, after each has written its DCP shards and before
the rename. Each call of a family's ``save_weights`` (SD1.5, SDXL, SD3, Flux, Wan) leaves a
``saved-by-rank-<RANK>`` file in the output directory. The jobs share one process group: the
trainer's ``cleanup`` only waits for every process here (a default group destroyed and made again
in one torchrun worker hangs its rendezvous); the worker leaves the group at the end. No job draws
curves.png (matplotlib, over a second a run; tests/test_train_e2e.py checks the plot)."""

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from fastpref import train
from fastpref.training.families.flux import FluxFamily
from fastpref.training.families.sd3 import StableDiffusion3Family
from fastpref.training.families.sdxl import StableDiffusionXLFamily
from fastpref.training.families.stable_diffusion import StableDiffusionFamily
from fastpref.training.families.wan import WanFamily
from fastpref.training.logging import MetricsLogger


def mark_saves(cls) -> None:
    """``cls.save_weights`` leaves ``saved-by-rank-<RANK>`` in the output directory first."""
    real_weights = cls.save_weights

    def save_weights(self, reference, output_dir):
        (Path(output_dir) / f"saved-by-rank-{os.environ['RANK']}").write_text("")
        return real_weights(self, reference, output_dir)

    cls.save_weights = save_weights


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    real_save = dcp.save
    for cls in (StableDiffusionFamily, StableDiffusionXLFamily, StableDiffusion3Family, FluxFamily, WanFamily):
        mark_saves(cls)
    train.cleanup = lambda state, model=None: dist.barrier()
    MetricsLogger.plot = lambda self, keys: None
    for job in jobs:
        kill = job.get("kill_at")

        def save(state, *, checkpoint_id, kill_at=kill, **kwargs):
            result = real_save(state, checkpoint_id=checkpoint_id, **kwargs)
            if kill_at is not None and f"-{kill_at}-" in str(checkpoint_id):
                os._exit(9)
            return result

        dcp.save = save
        train.main(job["argv"])
    dcp.save = real_save
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
