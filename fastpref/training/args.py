"""Command-line flags of ``fastpref-train`` (named after diffusers' ``train_diffusion_dpo.py``)
and their validation, which runs before anything is written."""

import argparse
import math
from pathlib import Path

from .exits import exit_status_text
from .losses import LOSS_TYPES

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_MODEL = ASSETS / "tiny-sd"
DEFAULT_DATA = ASSETS / "tiny-prefs.parquet"
BUNDLED_DATA = {
    DEFAULT_MODEL: DEFAULT_DATA,
    ASSETS / "tiny-sdxl": ASSETS / "tiny-sdxl-prefs.parquet",
    ASSETS / "tiny-sd3": ASSETS / "tiny-sd3-prefs.parquet",
    ASSETS / "tiny-wan": ASSETS / "tiny-wan-prefs.parquet",  # a video index of mp4 files under tiny-wan-prefs/
}
"""Each bundled tiny pipeline -> its bundled preference set: the data a run on that pipeline
trains on when neither ``--dataset_name`` nor ``--train_data_dir`` is given."""
FLOW_MATCHING_DEFAULTS = {"weighting_scheme": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29}
"""The flow-matching timestep flags (diffusers' names, meanings and defaults, docs/methods.md §7).
The parser's default is None, so that a DDPM family can refuse them; a flow family fills these."""
WEIGHTING_SCHEMES = ("logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap")
VIDEO_FLAGS = ("num_frames", "frame_stride")  # video families only (fastpref.training.video_data)
FAMILY_FLAGS = {**dict.fromkeys(FLOW_MATCHING_DEFAULTS, "flow matching"), **dict.fromkeys(VIDEO_FLAGS, "video")}
"""Flags that only some model families take -> their kind; a family names the kinds it takes in
``ModelFamily.flag_kinds`` and refuses any other (``ModelFamily.check_flags``)."""
SDPA_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}
"""``--sdpa_backend`` values -> ``torch.nn.attention.SDPBackend`` member names."""
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


DEFAULT_LEARNING_RATE = {"lora": 5e-4, "copy": 1e-6}
"""Default ``--learning_rate`` per ``--reference`` mode, chosen from 100-step runs on the bundled
tiny model (docs/training.md, "Learning rate"): full fine-tuning diverges at LoRA's rate."""

# float flags: (lower bound, whether the bound itself is allowed, upper bound or None); every value finite
FLOAT_RANGES = {
    "learning_rate": (0.0, False, None),
    "max_grad_norm": (0.0, False, None),
    "adam_beta1": (0.0, True, 1.0),
    "adam_beta2": (0.0, True, 1.0),
    "adam_weight_decay": (0.0, True, None),
    "adam_epsilon": (0.0, True, None),
    "beta": (0.0, False, None),
    "rpo_tau": (0.0, False, None),
    "sspo_guidance_scale": (0.0, True, None),
    "logit_mean": (-math.inf, False, None),
    "logit_std": (0.0, False, None),
    "mode_scale": (-math.inf, False, None),
}
# integer flags: the smallest accepted value
INT_MINIMUM = {
    "train_batch_size": 1,
    "gradient_accumulation_steps": 1,
    "max_train_steps": 1,
    "checkpointing_steps": 1,
    "rank": 1,
    "logging_steps": 1,
    "resolution": 1,
    "checkpoints_total_limit": 1,
    "sspo_snapshot_steps": 1,
    "sspo_sample_steps": 1,
    "num_frames": 1,
    "frame_stride": 1,
    "lr_warmup_steps": 0,
    "sspo_num_snapshots": 0,
    "online_pairs_every": 1,
    "online_num_prompts": 1,
    "online_num_samples": 2,
    "online_sample_steps": 1,
}


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" to every flag's help unless the help states its default itself."""

    def _get_help_string(self, action):
        if "default:" in (action.help or "") or action.default is None and action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the trainer (imports nothing heavy, so ``--help`` is fast)."""
    p = argparse.ArgumentParser(
        prog="fastpref-train",
        formatter_class=_DefaultsFormatter,
        description="Preference alignment (Diffusion-DPO, DSPO, RPO, KTO, SSPO, MaPO, ...) of a "
        "Stable-Diffusion-layout model with fastpref's fused losses. Defaults train the bundled tiny "
        "model on the bundled tiny preference set.",
        epilog=exit_status_text(),
    )
    a = p.add_argument
    a(
        "--pretrained_model_name_or_path",
        default=str(DEFAULT_MODEL),
        help="local diffusers Stable Diffusion directory (default: the bundled tiny pipeline)",
    )
    a(
        "--dataset_name",
        default=None,
        help="local Pick-a-Pic-layout pairs: a parquet file, a directory of them, a parquet glob ('data/*.parquet') "
        "or a datasets save_to_disk directory (fastpref-pairs writes such a parquet); video families: a video "
        "index (.parquet/.csv with video_0, video_1, label_0, caption) or a directory of them",
    )
    a("--train_data_dir", default=None, help="same as --dataset_name (default: the bundled tiny set)")
    a("--dataset_split", default="train", help="the split of a save_to_disk DatasetDict")
    a(
        "--dataset_streaming",
        action="store_true",
        help="read the data through a datasets IterableDataset in one pass at start (no cache files written); "
        "same rows and batches",
    )
    a(
        "--skip_bad_rows",
        action="store_true",
        help="drop rows whose caption, label or images are missing or undecodable (every image is decoded "
        "once at start) and log how many; without it such a row is an error naming file, row and column",
    )
    a(
        "--resolution",
        type=int,
        default=None,
        help="training resolution (default: the VAE's sample_size; video families: the first video's shorter side)",
    )
    a("--random_crop", action="store_true", help="random instead of centre crops")
    a("--no_hflip", action="store_true", help="disable random horizontal flips")
    a(
        "--train_batch_size",
        type=int,
        default=4,
        help="preference pairs per process per micro-step (kto: 2x this many single images)",
    )
    a("--gradient_accumulation_steps", type=int, default=1, help="micro-steps per optimizer step")
    a("--max_train_steps", type=int, default=100, help="optimizer steps")
    a(
        "--learning_rate",
        type=float,
        default=None,
        help=f"AdamW learning rate (default: {DEFAULT_LEARNING_RATE['lora']:g} with --reference lora, "
        f"{DEFAULT_LEARNING_RATE['copy']:g} with --reference copy; the value used is in args.json)",
    )
    a("--scale_lr", action="store_true", help="multiply the LR by batch x accumulation x processes")
    a("--lr_scheduler", default="constant", choices=LR_SCHEDULERS, help="diffusers LR schedule")
    a("--lr_warmup_steps", type=int, default=0, help="LR warm-up steps of the schedule")
    a("--max_grad_norm", type=float, default=1.0, help="clip the gradient norm to this (> 0)")
    a("--adam_beta1", type=float, default=0.9, help="AdamW beta1, in [0, 1)")
    a("--adam_beta2", type=float, default=0.999, help="AdamW beta2, in [0, 1)")
    a("--adam_weight_decay", type=float, default=1e-2, help="AdamW decoupled weight decay")
    a("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon")
    a(
        "--mixed_precision",
        default="no",
        choices=("no", "fp16", "bf16"),
        help="weight dtype and autocast of the frozen parts and the forward passes",
    )
    a("--gradient_checkpointing", action="store_true", help="activation checkpointing in the UNet")
    a(
        "--enable_xformers_memory_efficient_attention",
        action="store_true",
        help="require xformers attention (default: xformers when installed and working on CUDA, "
        "PyTorch SDPA otherwise)",
    )
    a(
        "--reference",
        default="lora",
        choices=("lora", "copy"),
        help="lora: train LoRA adapters, reference = adapters disabled; copy: full fine-tuning "
        "against a frozen copy of the UNet",
    )
    a("--rank", type=int, default=4, help="LoRA rank (--reference lora)")
    a("--loss_type", default="dpo", help=f"one of {', '.join(LOSS_TYPES)}")
    a(
        "--beta",
        type=float,
        default=None,
        help="β in the official convention (docs/methods.md §2.1); default: the loss type's own default "
        "(5000 for dpo*, 0.001 for dspo*)",
    )
    a("--beta_dpo", type=float, default=None, help=argparse.SUPPRESS)
    a(
        "--rpo_tau",
        type=float,
        default=0.5,
        help="--loss_type rpo: softmax temperature of the prompt-similarity weights (docs/methods.md §2.4)",
    )
    a(
        "--sspo_snapshot_steps",
        type=int,
        default=25,
        help="--loss_type sspo: snapshot the trained weights every this many steps for replay",
    )
    a(
        "--sspo_num_snapshots",
        type=int,
        default=4,
        help="--loss_type sspo: snapshots kept besides the initial weights (oldest dropped first)",
    )
    a(
        "--sspo_sample_steps",
        type=int,
        default=10,
        help="--loss_type sspo: steps of the self-sampler (DDIM; flow families: Euler)",
    )
    a(
        "--sspo_guidance_scale",
        type=float,
        default=3.0,
        help="--loss_type sspo: classifier-free guidance scale of the self-sampler",
    )
    a(
        "--cuda_graph",
        action="store_true",
        help="capture the whole training step in one CUDA graph after 3 eager warm-up steps and "
        "replay it (one process, CUDA only; fp16 captures forward and backward only)",
    )
    a(
        "--fsdp",
        action="store_true",
        help="torchrun only: shard the denoiser (and a --reference copy) per block with FSDP2, "
        "checkpoints through torch.distributed.checkpoint (docs/training.md, 'Sharded training (FSDP2)')",
    )
    a(
        "--fsdp_cpu_offload",
        action="store_true",
        help="--fsdp: keep the shards of parameters, gradients and optimizer state in host memory",
    )
    speed = "speed option (docs/training.md, Speed options): "
    a(
        "--cache_latents",
        action="store_true",
        help=speed + "encode every training image (VAE posterior mean and std, both flip variants) and caption "
        "once at start into a safetensors cache, so a step runs no encoder; refused with --random_crop",
    )
    a(
        "--latents_cache_dir",
        default=None,
        help=speed + "directory of the --cache_latents files (default: <output_dir>/latents_cache)",
    )
    a(
        "--compile_denoiser",
        action="store_true",
        help=speed + "torch.compile the denoiser's repeated blocks (regional compilation); the first step's "
        "compile time is logged apart as compile_s",
    )
    a(
        "--compile_backend",
        default="inductor",
        choices=("inductor", "aot_eager", "eager"),
        help=speed + "torch.compile backend of --compile_denoiser (aot_eager: no code generation, for tests)",
    )
    a("--channels_last", action="store_true", help=speed + "UNet families: channels-last memory format")
    a(
        "--use_fused_adam",
        action="store_true",
        help=speed + "AdamW(fused=True): one kernel for all parameters (CUDA; on CPU PyTorch's fused CPU AdamW)",
    )
    a("--allow_tf32", action="store_true", help=speed + "TF32 matmuls and convolutions for float32 (Ampere+)")
    a(
        "--sdpa_backend",
        default=None,
        choices=tuple(SDPA_BACKENDS),
        help=speed + "the one SDPA kernel the denoiser's attention may use (default: PyTorch's choice)",
    )
    a(
        "--fp8",
        action="store_true",
        help=speed + "FP8 training of the denoiser's linear layers through torchao (CUDA, compute capability "
        ">= 8.9, torchao installed; refused otherwise)",
    )
    flow = "flow-matching families (SD3, Flux) only: "
    a(
        "--weighting_scheme",
        default=None,
        choices=WEIGHTING_SCHEMES,
        help=flow + "the density of the training σ, as diffusers' compute_density_for_timestep_sampling; "
        "sigma_sqrt and cosmap draw uniformly and weight each row's squared error by diffusers' "
        "compute_loss_weighting_for_sd3 (docs/methods.md §7; default: logit_normal)",
    )
    a("--logit_mean", type=float, default=None, help=flow + "mean of the logit_normal scheme (default: 0.0)")
    a(
        "--logit_std",
        type=float,
        default=None,
        help=flow + "standard deviation of the logit_normal scheme (default: 1.0)",
    )
    a("--mode_scale", type=float, default=None, help=flow + "scale of the mode scheme (default: 1.29)")
    video = "video families (Wan) only: "
    a(
        "--num_frames",
        type=int,
        default=None,
        help=video + "frames per training clip, 1 + 4k for Wan's VAE (default: the frame count of the "
        "first row's video_0)",
    )
    a(
        "--frame_stride",
        type=int,
        default=None,
        help=video + "a clip is frames 0, s, 2s, ... of each video, counted from its first frame (default: 1)",
    )
    a(
        "--online_pairs_every",
        type=int,
        default=None,
        help="on-line pairs: regenerate the preference set from the current policy at step 0 and every this many "
        "steps (sample --online_num_samples images per prompt, score with --reward, best vs worst; docs/training.md)",
    )
    a("--online_prompts", default=None, help="prompts file of the on-line pairs (default: the training set's captions)")
    a("--online_num_prompts", type=int, default=None, help="use the first this many on-line prompts (default: all)")
    a("--online_num_samples", type=int, default=2, help="images sampled per prompt at each refresh (K >= 2)")
    a("--online_sample_steps", type=int, default=20, help="sampling steps of the on-line pairs")
    a("--online_guidance_scale", type=float, default=3.0, help="classifier-free guidance of the on-line pairs")
    a("--online_min_margin", type=float, default=0.0, help="keep an on-line pair only when its reward margin is above")
    a("--reward", default="colourfulness", help="reward of the on-line pairs: a fastpref-pairs reward, module:callable")
    a("--reward_model_path", default=None, help="local model directory of a model-based --reward")
    a("--reward_processor_path", default=None, help="its processor directory (default: --reward_model_path)")
    a("--reward_head_path", default=None, help="--reward aesthetic: the predictor's MLP weights file")
    a("--checkpointing_steps", type=int, default=500, help="write a checkpoint every this many steps")
    a("--checkpoints_total_limit", type=int, default=None, help="keep at most this many checkpoints (default: all)")
    a(
        "--resume_from_checkpoint",
        default=None,
        help="a checkpoint directory, or 'latest' (the newest complete checkpoint of --output_dir; none yet: "
        "start afresh)",
    )
    a("--output_dir", default="fastpref-output", help="directory for args.json, metrics, checkpoints and weights")
    a("--seed", type=int, default=0, help="seed of the initialisation and of every data-stream draw")
    a(
        "--report_to",
        default="tensorboard",
        choices=("tensorboard", "csv", "all", "none"),
        help="CSV metrics and curves.png are always written; tensorboard adds event files",
    )
    a(
        "--logging_steps",
        type=int,
        default=1,
        help="read and log the metrics every this many steps (also where non-finite loss or weights are caught)",
    )
    return p


def beta_dpo_message(beta_dpo: float) -> str:
    """Why ``--beta_dpo`` is refused and which ``--beta`` reproduces each upstream convention."""
    return (
        f"--beta_dpo is not accepted: fastpref's --beta follows the official Diffusion-DPO "
        f"convention, loss = -log sigmoid(-0.5 * beta * (...)). For --beta_dpo {beta_dpo:g} copied "
        f"from diffusers' train_diffusion_dpo.py (SD1.5, no 0.5 factor) pass --beta {2 * beta_dpo:g}; "
        f"from diffusers' train_diffusion_dpo_sdxl.py, SalesforceAIResearch/DiffusionDPO or "
        f"huaishengzhu/DSPO pass --beta {beta_dpo:g}."
    )


def check_numbers(args: argparse.Namespace) -> None:
    """Every numeric flag finite and in range (ValueError naming the flag, expected and actual)."""
    for name, (low, low_ok, high) in FLOAT_RANGES.items():
        value = getattr(args, name)
        if value is None:
            continue
        upper = "" if high is None else f" and < {high:g}"
        if (
            not math.isfinite(value)
            or value < low
            or (value == low and not low_ok)
            or (high is not None and value >= high)
        ):
            relation = ">=" if low_ok else ">"
            raise ValueError(f"--{name}: expected a finite number {relation} {low:g}{upper}, got {value}")
    for name, minimum in INT_MINIMUM.items():
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise ValueError(f"--{name}: expected an integer >= {minimum}, got {value}")


def default_data(pretrained: str | Path) -> Path:
    """The bundled preference set of the bundled pipeline ``pretrained``; the SD1.5 set for any
    other pipeline (whose own data the user names with ``--dataset_name``)."""
    return BUNDLED_DATA.get(Path(pretrained).resolve(), DEFAULT_DATA)


def parse_args(argv: list[str] | None = None, defaults: dict | None = None) -> argparse.Namespace:
    """Parse and check the flags (no model or data access); ValueError names the flag.
    ``args.learning_rate`` is filled with the ``--reference`` mode's default when not given.
    ``defaults`` (flag name -> value) replace the parser's defaults; ``argv`` overrides them."""
    parser = build_parser()
    parser.set_defaults(**(defaults or {}))
    args = parser.parse_args(argv)
    if args.beta_dpo is not None:
        raise ValueError(beta_dpo_message(args.beta_dpo))
    if args.loss_type not in LOSS_TYPES:
        raise ValueError(f"--loss_type: expected one of {sorted(LOSS_TYPES)}, got {args.loss_type!r}")
    if args.dataset_name and args.train_data_dir and args.dataset_name != args.train_data_dir:
        raise ValueError(
            f"--dataset_name and --train_data_dir: give one, got {args.dataset_name!r} and {args.train_data_dir!r}"
        )
    args.data_argument = "--dataset_name" if args.dataset_name else "--train_data_dir"
    args.data_path = args.dataset_name or args.train_data_dir or str(default_data(args.pretrained_model_name_or_path))
    if args.learning_rate is None:
        args.learning_rate = DEFAULT_LEARNING_RATE[args.reference]
    check_numbers(args)
    output = Path(args.output_dir)
    blocking = next((p for p in (output, *output.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ValueError(
            f"--output_dir: expected a directory (existing or new), got {args.output_dir!r}, "
            f"{'which is' if blocking == output else f'whose parent {str(blocking)!r} is'} a file"
        )
    return args
