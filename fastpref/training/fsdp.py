"""Sharded training (``--fsdp``): the denoiser, and a ``--reference copy`` frozen copy, sharded per
block with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``), and sharded checkpoints
through Distributed Checkpoint (DCP).

Every parameter is a ``DTensor`` sharded along dim 0 over the processes; a block's weights are
all-gathered for its forward and backward and freed after, so each process holds 1/N of the
parameters, gradients and AdamW state. LoRA: base weights and adapters are sharded alike, and
the reference forward runs the same sharded module with the adapters off. Gradient accumulation
reduces gradients on the last micro-step only (``set_requires_gradient_sync``).

Layout of a sharded ``checkpoint-<step>/`` (docs/training.md, "Sharded training (FSDP2)"):

- ``dcp/``                  DCP files of the trainable tensors and their AdamW state (keys are
                            the parameters' names, so any number of processes can load them);
- ``rng-<rank>.safetensors``  each process's torch generator states;
- ``state.json``            step, data position, LR schedule, flags, world size, written last.

All processes write into one hidden temporary directory; rank 0 renames it into place after
every process has finished, so ``latest`` never picks a torn checkpoint. The output directory
must be shared by every node (a network file system) for multi-node runs.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import STATE_FILE, TMP_PREFIX, _fsync, _json_value, check_resume_config

DCP_DIR = "dcp"
FORMAT = "fsdp2-dcp"
SHARDED_STATE_KEYS = ("step", "data_position", "lr_scheduler", "world_size", "format")
TORCHRUN_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
WEIGHT_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def fsdp_refusal(config, environ: Mapping[str, str]) -> str | None:
    """Why ``--fsdp`` / ``--fsdp_cpu_offload`` cannot run with ``config`` in the process environment
    ``environ`` (None when they can). Reads no file."""
    if not config.fsdp:
        return "--fsdp_cpu_offload: needs --fsdp" if config.fsdp_cpu_offload else None
    missing = [k for k in TORCHRUN_ENV if k not in environ]
    if missing:
        return (
            f"--fsdp: needs a torchrun launch (expected {', '.join(TORCHRUN_ENV)} in the environment, "
            f"missing {', '.join(missing)}); run torchrun --nproc_per_node N -m fastpref.train --fsdp ..."
        )
    if config.cuda_graph:
        return (
            "--fsdp with --cuda_graph: refused, because FSDP2's per-block all-gathers and "
            "reduce-scatters are not captured by this step; drop one of the two flags"
        )
    if config.mixed_precision == "fp16":
        return (
            "--fsdp with --mixed_precision fp16: refused, because the fp16 grad scaler does not "
            "unscale sharded gradients here; use --mixed_precision bf16 (or no)"
        )
    for flag in ("fp8", "compile_denoiser"):  # not checked with FSDP2's per-block hooks: refused, not guessed
        if getattr(config, flag, False):
            return (
                f"--fsdp with --{flag}: refused, this combination is not tested (FSDP2 wraps each block "
                f"in all-gather hooks); drop one of the two flags"
            )
    if config.loss_type == "sspo":
        return (
            "--fsdp with --loss_type sspo: refused, SSPO's replay pool copies unsharded weights; run it without --fsdp"
        )
    if config.online_pairs_every is not None:
        return (
            "--fsdp with --online_pairs_every: refused, on-line sampling runs the policy on each process's "
            "own prompts, which a sharded model cannot; run it without --fsdp"
        )
    return None


def check_sharded_resume(path: Path, config, world_size: int) -> dict:
    """The safe flags a ``--fsdp`` resume from ``path`` changes (``check_resume_config``'s), which
    may run on another number of processes ``world_size`` when the global batch stays: the
    checkpoint's ``--train_batch_size`` x its world size must equal this run's. ValueError naming
    ``--train_batch_size`` or the world size otherwise (a world size that does not divide the
    global batch)."""
    state = json.loads((Path(path) / STATE_FILE).read_text())
    old_config = state.get("config") or {}
    if state.get("format") != FORMAT:
        raise ValueError(
            f"--fsdp --resume_from_checkpoint: {str(path)!r} is not a sharded checkpoint (written without "
            f"--fsdp); resume it without --fsdp"
        )
    old_world, old_batch = int(state["world_size"]), int(old_config.get("train_batch_size", config.train_batch_size))
    global_batch = old_batch * old_world
    if global_batch % world_size:
        raise ValueError(
            f"--fsdp --resume_from_checkpoint: {str(path)!r} trained a global batch of {global_batch} "
            f"(--train_batch_size {old_batch} x {old_world} processes), which {world_size} processes "
            f"(WORLD_SIZE) do not divide; resume on a number of processes that divides {global_batch}"
        )
    if config.train_batch_size * world_size != global_batch:
        raise ValueError(
            f"--train_batch_size: resuming {str(path)!r} (global batch {global_batch} = {old_batch} x "
            f"{old_world} processes) on {world_size} processes needs --train_batch_size "
            f"{global_batch // world_size}, got {config.train_batch_size}"
        )
    changed = check_resume_config(path, config.replace(train_batch_size=old_batch).as_dict())
    if world_size != old_world:
        changed["train_batch_size"] = {"old": old_batch, "new": config.train_batch_size}
        changed["world_size"] = {"old": old_world, "new": world_size}
    return changed


def _dtensor_local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def is_sharded(params: list[torch.Tensor]) -> bool:
    """Whether any of ``params`` is a DTensor (an FSDP2 shard)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in params)


def all_finite_across(flags: torch.Tensor) -> torch.Tensor:
    """``flags`` (a bool tensor of this process's shards) reduced over every process: all True."""
    value = flags.all().to(torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return value.bool()


def _blocks(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The denoiser's blocks: every member of a top-level ``ModuleList`` (a UNet's down and up
    blocks, a transformer's ``transformer_blocks`` and ``single_transformer_blocks``)."""
    for child in module.children():
        if isinstance(child, torch.nn.ModuleList):
            yield from child


def shard_module(module: torch.nn.Module, mesh, mixed_precision: str, cpu_offload: bool) -> torch.nn.Module:
    """``fully_shard`` each block of ``module`` and then the module (its remaining parameters), in
    place, with the mixed-precision policy of ``--mixed_precision`` (bf16 compute and all-gathers,
    float32 gradient reduction; ``no``: float32) and, with ``cpu_offload``, parameters, gradients
    and optimizer state in host memory. Returns ``module``."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    dtype = WEIGHT_DTYPES[mixed_precision]
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype is not None else None)
    offload = CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda") if cpu_offload else OffloadPolicy()
    for block in _blocks(module):
        fully_shard(block, mesh=mesh, mp_policy=policy, offload_policy=offload)
    fully_shard(module, mesh=mesh, mp_policy=policy, offload_policy=offload)
    return module


class ShardedRun:
    """The FSDP2 side of a ``--fsdp`` run: the sharded denoiser (and reference copy), the
    gradient-sync switch of accumulation, sharded checkpoints and the gathered final weights.

    ``denoiser`` (float32 trainable parameters, LoRA adapters attached when ``reference ==
    "lora"``) and ``reference_model`` (a frozen copy or None) are sharded in place; ``params``
    are the trainable parameters afterwards (DTensors: build the optimizer over these)."""

    def __init__(self, denoiser, reference_model, config, state):
        self.state, self.reference = state, config.reference
        self.denoiser_class, self.denoiser_config = type(denoiser), copy.deepcopy(dict(denoiser.config))
        self.lora_config = copy.deepcopy(denoiser.peft_config["default"]) if config.reference == "lora" else None
        self.owns_group = not dist.is_initialized()
        if self.owns_group:  # one process: torchrun's rendezvous still describes the group
            dist.init_process_group(backend="nccl" if state.device.type == "cuda" else "gloo")
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh(state.device.type, (dist.get_world_size(),))
        self.denoiser = shard_module(denoiser, self.mesh, config.mixed_precision, config.fsdp_cpu_offload)
        if reference_model is not None:
            shard_module(reference_model, self.mesh, config.mixed_precision, config.fsdp_cpu_offload)
        self.params = [p for p in denoiser.parameters() if p.requires_grad]

    @contextmanager
    def no_sync(self):
        """A non-final micro-step: gradients accumulate locally, no reduce-scatter."""
        self.denoiser.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.denoiser.set_requires_gradient_sync(True)

    def _state_dicts(self, optimizer):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model, optim = get_state_dict(self.denoiser, optimizer, options=StateDictOptions(ignore_frozen_params=True))
        return {"model": model, "optim": optim}

    def save_checkpoint(
        self, output_dir: Path, step: int, *, optimizer, lr_scheduler, data_position: int, config: dict
    ) -> Path:
        """Every process: write the sharded ``checkpoint-<step>`` atomically (see the module
        docstring); returns its path. Collective."""
        import torch.distributed.checkpoint as dcp
        from safetensors.torch import save_file

        output_dir = Path(output_dir)
        final, tmp = output_dir / f"checkpoint-{step}", output_dir / f"{TMP_PREFIX}{step}-sharded"
        if self.state.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        dcp.save(self._state_dicts(optimizer), checkpoint_id=tmp / DCP_DIR)
        rng = {"torch_cpu": torch.get_rng_state()}
        if self.state.device.type == "cuda":
            rng["torch_cuda"] = torch.cuda.get_rng_state(self.state.device)
        rng_file = tmp / f"rng-{self.state.rank}.safetensors"
        save_file(rng, rng_file)
        _fsync(rng_file)
        dist.barrier()  # every shard on disk
        if self.state.is_main:
            state = {
                "format": FORMAT,
                "step": step,
                "data_position": data_position,
                "world_size": dist.get_world_size(),
                "lr_scheduler": lr_scheduler.state_dict(),
                "extra": {},
                "config": config,
            }
            for file in (tmp / DCP_DIR).iterdir():
                _fsync(file)
            _fsync(tmp / DCP_DIR)
            with open(tmp / STATE_FILE, "w") as f:
                json.dump(state, f, indent=1, default=_json_value)
                f.flush()
                os.fsync(f.fileno())
            _fsync(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync(output_dir)
        dist.barrier()
        return final

    def load_checkpoint(self, path: Path, optimizer, lr_scheduler) -> dict:
        """Every process: restore the trainable tensors, AdamW state, LR schedule and (same rank
        present) the generator states from the sharded checkpoint ``path``, written by any number of
        processes; returns its state.json. ValueError naming ``--resume_from_checkpoint`` when
        its tensors do not fit this model. Collective."""
        import torch.distributed.checkpoint as dcp
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        path = Path(path)
        state = verify_sharded_checkpoint(path)
        target = self._state_dicts(optimizer)
        try:
            dcp.load(target, checkpoint_id=path / DCP_DIR)
            set_state_dict(
                self.denoiser,
                optimizer,
                model_state_dict=target["model"],
                optim_state_dict=target["optim"],
                # strict=False: the frozen weights stay the pretrained ones; every trainable key is
                # in ``target`` (built from this model), and dcp.load refuses one the checkpoint lacks
                options=StateDictOptions(ignore_frozen_params=True, strict=False),
            )
        except (RuntimeError, ValueError, KeyError) as error:  # another model or --rank
            raise ValueError(
                f"--resume_from_checkpoint: {str(path / DCP_DIR)!r} does not fit this model (another --rank or "
                f"model?): {str(error)[:300]}"
            ) from error
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        rng_file = path / f"rng-{self.state.rank}.safetensors"
        if rng_file.is_file():
            rng = load_file(rng_file)
            torch.set_rng_state(rng["torch_cpu"])
            if "torch_cuda" in rng and self.state.device.type == "cuda":
                torch.cuda.set_rng_state(rng["torch_cuda"], self.state.device)
        return state

    def save_weights(self, family, output_dir: Path) -> None:
        """Every process: gather the trained tensors (to rank 0's host memory); rank 0 alone then
        writes them in the pipeline's format (``family.save_weights``: the LoRA file or the
        denoiser directory) from an unsharded twin of the denoiser. Collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        lora = self.reference == "lora"
        full = get_model_state_dict(
            self.denoiser, options=StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=lora)
        )
        if self.state.is_main:
            with torch.device("meta"):
                twin = self.denoiser_class.from_config(self.denoiser_config)
                if lora:
                    twin.add_adapter(copy.deepcopy(self.lora_config))
            result = twin.load_state_dict(full, strict=not lora, assign=True)
            if lora and result.unexpected_keys:
                raise RuntimeError(f"gathered LoRA weights: unexpected keys {result.unexpected_keys[:4]}")
            sharded, family.denoiser = family.denoiser, twin
            try:
                family.save_weights(self.reference, Path(output_dir))
            finally:
                family.denoiser = sharded
        dist.barrier()

    def close(self) -> None:
        """Leave the process group this object started (one process); a no-op otherwise."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def verify_sharded_checkpoint(path: Path) -> dict:
    """The parsed state.json of the sharded checkpoint ``path`` after checking it is whole: state.json
    a JSON object with ``SHARDED_STATE_KEYS``, the DCP metadata readable and every storage file it
    names present and long enough. ValueError naming the file otherwise."""
    from torch.distributed.checkpoint import FileSystemReader

    path = Path(path)
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except FileNotFoundError as error:
        raise ValueError(f"{str(path / STATE_FILE)!r} is missing") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{str(path / STATE_FILE)!r} is not valid JSON ({error})") from error
    missing = [k for k in SHARDED_STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{str(path / STATE_FILE)!r} lacks {missing}; expected {list(SHARDED_STATE_KEYS)}")
    try:
        metadata = FileSystemReader(path / DCP_DIR).read_metadata()
    except Exception as error:  # DCP raises several types for a missing or torn .metadata
        raise ValueError(
            f"{str(path / DCP_DIR)!r}: unreadable DCP metadata ({type(error).__name__}: {error})"
        ) from error
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        file = path / DCP_DIR / name
        size = file.stat().st_size if file.is_file() else -1
        if size < end:
            raise ValueError(f"{str(file)!r} is missing or truncated (expected >= {end} bytes, got {size})")
    return state


def is_sharded_checkpoint(path: Path) -> bool:
    """Whether ``path`` looks like a sharded checkpoint (a ``dcp/`` directory beside state.json)."""
    return (Path(path) / DCP_DIR).is_dir()
