"""Atomic training checkpoints: safetensors tensors plus a JSON state, no pickle.

Layout of ``<output_dir>/checkpoint-<step>/``:

- ``trainable.safetensors``  the trained parameters (LoRA adapters or the full UNet);
- ``optimizer.safetensors``  the optimizer's per-parameter state tensors;
- ``rng.safetensors``        torch CPU (and CUDA) generator states;
- ``<name>.safetensors``     any extra tensor files the caller adds (SSPO's replay pool);
- ``state.json``             step, data position, optimizer hyper-parameters, LR-scheduler and
                             grad-scaler state, the run's flags (``config``), written last.

A checkpoint is written into a hidden temporary directory, every file and the directory are
fsynced, and it is renamed into place, so a directory named ``checkpoint-<step>`` is always
complete and ``latest`` never picks a half-written one. ``verify_checkpoint`` checks a
checkpoint's files (ValueError naming the file); ``resolve_resume("latest")`` takes the newest
one that verifies; ``check_resume_config`` refuses a resume whose run-defining flags differ
(docs/training.md, "Resuming").
"""

import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-checkpoint-"
STATE_FILE = "state.json"
CONSTRUCTION_FLAGS = ("capturable", "foreach", "fused", "differentiable", "maximize")
TENSOR_FILES = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors")
STATE_KEYS = ("step", "data_position", "optimizer_param_groups", "optimizer_scalars", "lr_scheduler")
SAFE_FLAGS = frozenset(
    {
        "max_train_steps",
        "checkpointing_steps",
        "checkpoints_total_limit",
        "logging_steps",
        "report_to",
        "output_dir",
        "resume_from_checkpoint",
        "cuda_graph",
        "enable_xformers_memory_efficient_attention",
        "gradient_checkpointing",
        "dataset_name",
        "train_data_dir",
        "dataset_streaming",
        "data_argument",  # the data itself is ``data_path``, compared
        "fsdp_cpu_offload",  # where FSDP2 keeps the shards, not what they hold
        # speed options (fastpref.training.speed) that leave the step's math as it is
        "cache_latents",
        "latents_cache_dir",
        "compile_denoiser",
        "compile_backend",
        "channels_last",
        "use_fused_adam",
        "allow_tf32",
        "sdpa_backend",
    }
)
"""Flags a resume may change: they do not change the math of the steps already taken or to come
(``max_train_steps`` only with a constant LR schedule: the others are stretched by it)."""
CONSTANT_SCHEDULES = ("constant", "constant_with_warmup")


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


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    data_position: int,
    grad_scaler=None,
    extra: dict | None = None,
    extra_files: dict[str, dict[str, torch.Tensor]] | None = None,
    config: dict | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically and return its path (call on rank 0 only).
    ``extra`` goes into state.json; ``extra_files`` maps file names to tensors to store;
    ``config`` (the run's flags) goes into state.json for ``check_resume_config``."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"{TMP_PREFIX}{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, tmp / "trainable.safetensors")
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
        "config": config,
    }
    for name in os.listdir(tmp):  # the tensor files on disk before state.json says the checkpoint is whole
        _fsync(tmp / name)
    with open(tmp / STATE_FILE, "w") as f:
        json.dump(state, f, indent=1, default=_json_value)
        f.flush()
        os.fsync(f.fileno())
    _fsync(tmp)
    if final.exists():  # a re-run of the same step replaces the old one
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(output_dir)
    return final


def _fsync(path: Path) -> None:
    """fsync a file or a directory (its entries)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_orphans(output_dir: str | Path) -> list[Path]:
    """Delete the ``.tmp-checkpoint-*`` directories of killed runs in ``output_dir`` (rank 0,
    before the loop), saying so on stderr; returns them."""
    output_dir = Path(output_dir)
    found = sorted(output_dir.glob(TMP_PREFIX + "*")) if output_dir.is_dir() else []
    for tmp in found:
        shutil.rmtree(tmp, ignore_errors=True)
    if found:
        print(
            f"fastpref-train: removed {len(found)} unfinished checkpoint directories of an interrupted run: "
            f"{', '.join(p.name for p in found)}",
            file=sys.stderr,
        )
    return found


def verify_checkpoint(path: str | Path) -> dict:
    """The parsed state.json of checkpoint ``path`` after checking its files: every file present,
    state.json a JSON object with the keys ``load_checkpoint`` reads, every ``.safetensors`` file
    a whole safetensors file. ValueError naming the file otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{str(path)!r} is not a checkpoint directory")
    from .fsdp import is_sharded_checkpoint, verify_sharded_checkpoint

    if is_sharded_checkpoint(path):  # --fsdp's layout (fastpref.training.fsdp)
        return verify_sharded_checkpoint(path)
    for name in (STATE_FILE, *TENSOR_FILES):
        if not (path / name).is_file():
            raise ValueError(f"{str(path / name)!r} is missing")
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{str(path / STATE_FILE)!r} is not valid JSON ({error})") from error
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{str(path / STATE_FILE)!r} lacks {missing}; expected a JSON object with {list(STATE_KEYS)}")
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(file, "pt") as f:
                f.keys()
        except (SafetensorError, OSError) as error:
            raise ValueError(
                f"{str(file)!r} is not a whole safetensors file (truncated or corrupt: {error})"
            ) from error
    return state


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a complete checkpoint directory written by ``save_checkpoint``."""
    path = Path(path)
    from .fsdp import is_sharded_checkpoint

    if is_sharded_checkpoint(path):
        return (path / STATE_FILE).is_file()
    return all(
        (path / name).is_file()
        for name in (STATE_FILE, "trainable.safetensors", "optimizer.safetensors", "rng.safetensors")
    )


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete ``checkpoint-<step>`` directories of ``output_dir``, oldest step first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in output_dir.iterdir()
        if (m := CHECKPOINT_PATTERN.match(p.name)) and is_checkpoint(p)
    ]
    return [p for _, p in sorted(found)]


def resolve_resume(resume_from_checkpoint: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: an explicit path, ``latest`` in ``output_dir``, or None.

    ``latest`` is the newest ``checkpoint-<step>`` that ``verify_checkpoint`` accepts; newer
    ones that fail are skipped, saying which and why on stderr; none yet starts a fresh run. An
    explicit path that fails is a ValueError naming the bad file.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        output_dir = Path(output_dir)
        steps = (
            sorted(
                ((int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))),
                reverse=True,
            )
            if output_dir.is_dir()
            else []
        )
        skipped = []
        for _, path in steps:
            try:
                verify_checkpoint(path)
            except ValueError as error:
                skipped.append(f"{path.name} ({error})")
                continue
            if skipped:
                print(
                    f"fastpref-train: --resume_from_checkpoint latest: resuming from {path.name}; skipped "
                    f"{len(skipped)} newer checkpoints that do not load: {'; '.join(skipped)}",
                    file=sys.stderr,
                )
            return path
        if skipped:
            print(
                f"fastpref-train: --resume_from_checkpoint latest: no checkpoint loads, starting afresh; skipped "
                f"{'; '.join(skipped)}",
                file=sys.stderr,
            )
        return None
    path = Path(resume_from_checkpoint)
    try:
        verify_checkpoint(path)
    except ValueError as error:
        raise ValueError(
            f"--resume_from_checkpoint: expected 'latest' or a checkpoint directory holding {STATE_FILE}, "
            f"trainable/optimizer/rng .safetensors, got {resume_from_checkpoint!r}: {error}"
        ) from error
    return path


def _normal(value):
    """A flag value as JSON stores it (tuples as lists), for comparison with a stored config."""
    return json.loads(json.dumps(value))


def check_resume_config(path: str | Path, config: dict) -> dict:
    """The safe flags a resume from checkpoint ``path`` changes, ``{flag: {"old", "new"}}``.

    The checkpoint's run is its state.json's ``config`` (or, for a checkpoint written without
    one, the ``args.json`` beside it; neither: nothing to compare, ``{}``). A difference in a
    flag outside ``SAFE_FLAGS`` (or in ``max_train_steps`` under a non-constant LR schedule) is
    a ValueError listing every such flag with the old and new value.
    """
    path = Path(path)
    state = json.loads((path / STATE_FILE).read_text())
    old = state.get("config")
    if old is None and (path.parent / "args.json").is_file():
        try:
            old = json.loads((path.parent / "args.json").read_text())
        except (OSError, json.JSONDecodeError):
            old = None
    if not isinstance(old, dict):
        return {}
    new = {k: _normal(v) for k, v in config.items()}
    from .args import build_parser  # a flag newer than the checkpoint, at its default, changes nothing

    defaults = {a.dest: _normal(a.default) for a in build_parser()._actions}
    differ = {
        k: (old.get(k), new.get(k))
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k) and not (k not in old and k in defaults and new.get(k) == defaults[k])
    }
    refused = {
        k: v
        for k, v in differ.items()
        if k not in SAFE_FLAGS or (k == "max_train_steps" and new.get("lr_scheduler") not in CONSTANT_SCHEDULES)
    }
    if refused:
        listing = "; ".join(f"--{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        note = (
            " (max_train_steps may change only with a constant --lr_scheduler)" if "max_train_steps" in refused else ""
        )
        if new.get("loss_type") == "sspo" and "sspo_pool_steps" not in (state.get("extra") or {}):
            note += " (the checkpoint holds no SSPO replay pool: start --loss_type sspo afresh)"
        raise ValueError(
            f"--resume_from_checkpoint: {str(path)!r} was written by a run with other flags: "
            f"{listing}{note}. Resume with the checkpoint's values, or start a new run in another "
            f"--output_dir"
        )
    return {k: {"old": a, "new": b} for k, (a, b) in differ.items() if k not in ("resume_from_checkpoint",)}


def record_resume(output_dir: str | Path, config: dict, path: str | Path, changed: dict, step: int) -> None:
    """Rank 0, a resumed run: ``args.json`` keeps the original run's flags (written from the
    checkpoint's config when missing) and ``resume-<step>.json`` records the checkpoint, the
    step and the safe flags this resume changed."""
    output_dir, path = Path(output_dir), Path(path)
    args = output_dir / "args.json"
    if not args.is_file():
        stored = json.loads((path / STATE_FILE).read_text()).get("config")
        args.write_text(json.dumps(stored if isinstance(stored, dict) else config, indent=1))
    (output_dir / f"resume-{step}.json").write_text(
        json.dumps({"checkpoint": str(path), "step": step, "changed": changed, "flags": config}, indent=1, default=str)
    )


def load_checkpoint(
    path: str | Path, optimizer: torch.optim.Optimizer, lr_scheduler, grad_scaler=None
) -> tuple[dict[str, torch.Tensor], dict]:
    """Restore optimizer, LR scheduler, grad scaler and RNG state from ``path``.

    Returns ``(trainable_tensors, state)``; the caller loads the tensors into its model (before
    calling this, so the optimizer state maps onto the right parameters) and reads
    ``state["step"]`` and ``state["data_position"]``.
    """
    path = Path(path)
    state = verify_checkpoint(path)
    trainable = load_file(path / "trainable.safetensors")
    opt_tensors = load_file(path / "optimizer.safetensors")
    tensor_hyper = [{k: v for k, v in group.items() if torch.is_tensor(v)} for group in optimizer.param_groups]
    built = [{k: group[k] for k in CONSTRUCTION_FLAGS if k in group} for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(
            _unflatten_optimizer_state(opt_tensors, state["optimizer_scalars"], state["optimizer_param_groups"])
        )
    except (ValueError, KeyError, TypeError, RuntimeError) as error:  # another parameter set (rank, model)
        raise ValueError(
            f"--resume_from_checkpoint: {str(path / 'optimizer.safetensors')!r} does not fit this "
            f"optimizer's parameters (another --rank or model?): {error}"
        ) from error
    restore_construction(optimizer, built)
    for group, tensors in zip(optimizer.param_groups, tensor_hyper, strict=True):
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
