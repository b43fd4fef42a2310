"""torchrun worker of tests/test_train_fsdp.py: several trainer runs in one launch (each launch
costs seconds of start-up per process), run in order from a JSON list of jobs
``{"argv": [...], "fail_at": step, "how": "raise" | "exit"}``.

``fail_at`` ends the run in the middle of writing sharded ``checkpoint-<fail_at>``, after every
process has written its DCP shards and before the rename: ``how == "raise"`` raises out of the
trainer (the next job runs in the same process group), ``"exit"`` kills every process on the spot
(``os._exit``; it must be the last job). Each call of the family's ``save_weights`` leaves a
``saved-by-rank-<RANK>`` file in the output directory. The jobs share one process group: the
trainer's ``cleanup`` only waits for every process here (a default group destroyed and made again
in one torchrun worker hangs its rendezvous); the worker leaves the group at the end."""

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from fastpref import train
from fastpref.training.families.stable_diffusion import StableDiffusionFamily


class Crash(RuntimeError):
    """The simulated crash of a ``"raise"`` job."""


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    real_save, real_weights = dcp.save, StableDiffusionFamily.save_weights

    def save_weights(self, reference, output_dir):
        (Path(output_dir) / f"saved-by-rank-{os.environ['RANK']}").write_text("")
        return real_weights(self, reference, output_dir)

    StableDiffusionFamily.save_weights = save_weights
    train.cleanup = lambda state, model=None: dist.barrier()
    for job in jobs:
        fail_at, how = job.get("fail_at"), job.get("how")

        def save(state, *, checkpoint_id, fail_at=fail_at, how=how, **kwargs):
            result = real_save(state, checkpoint_id=checkpoint_id, **kwargs)
            if fail_at is not None and f"-{fail_at}-" in str(checkpoint_id):
                if how == "exit":
                    os._exit(9)
                raise Crash(f"simulated crash while writing checkpoint-{fail_at}")
            return result

        dcp.save = save
        try:
            train.main(job["argv"])
        except Crash:
            pass
    dcp.save = real_save
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
