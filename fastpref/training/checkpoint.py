"""Atomic training checkpoints: safetensors tensors plus a JSON state, no pickle.

Layout of ``<output_dir>/checkpoint-<step>/``:

- ``trainable.safetensors``  the trained parameters (LoRA adapters or the full UNet);
- ``optimizer.safetensors``  the optimizer's per-parameter state tensors;
- ``rng.safetensors``        torch CPU (and CUDA) generator states;
- ``<name>.safetensors``     any extra tensor files the caller adds (SSPO's replay pool);
- ``state.json``             step, data position, optimizer hyper-parameters, LR-scheduler and
                             grad-scaler state, written last.

A checkpoint is written into a hidden temporary directory and renamed into place, so a
directory named ``checkpoint-<step>`` is always complete and ``latest`` never picks a
half-written one.
"""

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "state.json"
CONSTRUCTION_FLAGS = ("capturable", "foreach", "fused", "differentiable", "maximize")


def _flatten_optimizer_state(state_dict: dict) -> tuple[dict, dict]:
    tensors, scalars = {}, {}
    for index, entries in state_dict["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, scalars


def _unflatten_optimizer_state(tensors: dict, scalars: dict, param_groups: list) -> dict:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(scalars.items()):
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": param_groups}


def _json_value(value):
    """0-dim tensors (a capturable optimizer's tensor LR) as floats in state.json."""
    if torch.is_tensor(value) and value.numel() == 1:
        return value.item()  # host-ok: checkpoint writing, outside the step
    raise TypeError(f"state.json: cannot store {type(value).__name__}")


def save_checkpoint(output_dir: str | Path, step: int, *, trainable: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, lr_scheduler, data_position: int,
                    grad_scaler=None, extra: dict | None = None,
                    extra_files: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write ``checkpoint-<step>`` atomically and return its path (call on rank 0 only).
    ``extra`` goes into state.json; ``extra_files`` maps file names to tensors to store."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".tmp-checkpoint-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()},
              tmp / "trainable.safetensors")
    opt_state = optimizer.state_dict()
    opt_tensors, opt_scalars = _flatten_optimizer_state(opt_state)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, tmp / "rng.safetensors")
    for name, tensors in (extra_files or {}).items():
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / name)
    state = {
        "step": step,
        "data_position": data_position,
        "optimizer_param_groups": opt_state["param_groups"],
        "optimizer_scalars": opt_scalars,
        "lr_scheduler": lr_scheduler.state_dict(),
        "grad_scaler": grad_scaler.state_dict() if grad_scaler is not None else None,
        "extra": extra or {},
    }
    with open(tmp / STATE_FILE, "w") as f:
        json.dump(state, f, indent=1, default=_json_value)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # a re-run of the same step replaces the old one
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a complete checkpoint directory written by ``save_checkpoint``."""
    path = Path(path)
    return all((path / name).is_file() for name in
               (STATE_FILE, "trainable.safetensors", "optimizer.safetensors", "rng.safetensors"))


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete ``checkpoint-<step>`` directories of ``output_dir``, oldest step first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir()
             if (m := CHECKPOINT_PATTERN.match(p.name)) and is_checkpoint(p)]
    return [p for _, p in sorted(found)]


def resolve_resume(resume_from_checkpoint: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: an explicit path, ``latest`` in ``output_dir``, or None.

    ``latest`` with no checkpoint yet starts a fresh run; an explicit path that is not a
    complete checkpoint is a ValueError.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from_checkpoint)
    if not is_checkpoint(path):
        raise ValueError(f"--resume_from_checkpoint: expected 'latest' or a checkpoint directory "
                         f"holding {STATE_FILE}, trainable/optimizer/rng .safetensors, "
                         f"got {resume_from_checkpoint!r}")
    return path


def load_checkpoint(path: str | Path, optimizer: torch.optim.Optimizer, lr_scheduler,
                    grad_scaler=None) -> tuple[dict[str, torch.Tensor], dict]:
    """Restore optimizer, LR scheduler, grad scaler and RNG state from ``path``.

    Returns ``(trainable_tensors, state)``; the caller loads the tensors into its model (before
    calling this, so the optimizer state maps onto the right parameters) and reads
    ``state["step"]`` and ``state["data_position"]``.
    """
    path = Path(path)
    with open(path / STATE_FILE) as f:
        state = json.load(f)
    trainable = load_file(path / "trainable.safetensors")
    opt_tensors = load_file(path / "optimizer.safetensors")
    tensor_hyper = [{k: v for k, v in group.items() if torch.is_tensor(v)} for group in optimizer.param_groups]
    built = [{k: group[k] for k in CONSTRUCTION_FLAGS if k in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(_unflatten_optimizer_state(
        opt_tensors, state["optimizer_scalars"], state["optimizer_param_groups"]))
    restore_construction(optimizer, built)
    for group, tensors in zip(optimizer.param_groups, tensor_hyper):
        for key, tensor in tensors.items():  # keep the tensor a captured step reads, refilled
            group[key] = tensor.fill_(group[key])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if grad_scaler is not None and state.get("grad_scaler"):
        grad_scaler.load_state_dict(state["grad_scaler"])
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["torch_cpu"])
    cuda_states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    return trainable, state


def restore_construction(optimizer: torch.optim.Optimizer, built: list[dict]) -> None:
    """Put back the flags the optimizer was built with (``capturable``, ``foreach``, ...), which
    ``load_state_dict`` overwrites with the checkpoint's (a checkpoint written without
    ``--cuda_graph`` resumed into a ``--cuda_graph`` run), and keep each step count where the
    flags need it: a capturable or fused AdamW's float32 on its parameter's device."""
    for group, flags in zip(optimizer.param_groups, built, strict=True):
        group.update(flags)
        on_device = group.get("capturable") or group.get("fused")
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if on_device and step is not None:
                optimizer.state[p]["step"] = torch.as_tensor(step, dtype=torch.float32).to(p.device)


def prune_checkpoints(output_dir: str | Path, total_limit: int | None) -> None:
    """Delete the oldest checkpoints so at most ``total_limit`` remain (None: keep all)."""
    if total_limit is None:
        return
    found = list_checkpoints(output_dir)
    for old in found[: max(0, len(found) - total_limit)]:
        shutil.rmtree(old)
