"""Command-line flags of ``fastpref-train`` (named after diffusers' ``train_diffusion_dpo.py``)
and their validation, which runs before anything is written."""

import argparse
from pathlib import Path

from .losses import LOSS_TYPES

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_MODEL = ASSETS / "tiny-sd"
DEFAULT_DATA = ASSETS / "tiny-prefs.parquet"
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the trainer."""
    p = argparse.ArgumentParser(
        prog="fastpref-train",
        description="Preference alignment (Diffusion-DPO, DSPO, RPO, KTO, SSPO, MaPO, ...) of a Stable-Diffusion-layout "
                    "model with fastpref's fused losses. Defaults train the bundled tiny model on "
                    "the bundled tiny preference set.")
    a = p.add_argument
    a("--pretrained_model_name_or_path", default=str(DEFAULT_MODEL),
      help="local diffusers Stable Diffusion directory (default: the bundled tiny pipeline)")
    a("--dataset_name", default=None, help="local Pick-a-Pic-layout parquet file or directory")
    a("--train_data_dir", default=None, help="same as --dataset_name (default: the bundled tiny set)")
    a("--resolution", type=int, default=None, help="training resolution (default: the VAE's sample_size)")
    a("--random_crop", action="store_true", help="random instead of centre crops")
    a("--no_hflip", action="store_true", help="disable random horizontal flips")
    a("--train_batch_size", type=int, default=4, help="preference pairs per process per micro-step (kto: 2x this many single images)")
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--max_train_steps", type=int, default=100, help="optimizer steps")
    a("--learning_rate", type=float, default=5e-4)
    a("--scale_lr", action="store_true", help="multiply the LR by batch x accumulation x processes")
    a("--lr_scheduler", default="constant", choices=LR_SCHEDULERS)
    a("--lr_warmup_steps", type=int, default=0)
    a("--max_grad_norm", type=float, default=1.0)
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=1e-2)
    a("--adam_epsilon", type=float, default=1e-8)
    a("--mixed_precision", default="no", choices=("no", "fp16", "bf16"))
    a("--gradient_checkpointing", action="store_true")
    a("--enable_xformers_memory_efficient_attention", action="store_true",
      help="require xformers attention (default: xformers when installed and working on CUDA, "
           "PyTorch SDPA otherwise)")
    a("--reference", default="lora", choices=("lora", "copy"),
      help="lora: train LoRA adapters, reference = adapters disabled; copy: full fine-tuning "
           "against a frozen copy of the UNet")
    a("--rank", type=int, default=4, help="LoRA rank (--reference lora)")
    a("--loss_type", default="dpo", help=f"one of {', '.join(LOSS_TYPES)}")
    a("--beta", type=float, default=None,
      help="β in the official convention (spec §2.1); default: the loss type's spec default "
           "(5000 for dpo*, 0.001 for dspo*)")
    a("--beta_dpo", type=float, default=None, help=argparse.SUPPRESS)
    a("--rpo_tau", type=float, default=0.5,
      help="--loss_type rpo: softmax temperature of the prompt-similarity weights (spec: 0.5)")
    a("--sspo_snapshot_steps", type=int, default=25,
      help="--loss_type sspo: snapshot the trained weights every this many steps for replay")
    a("--sspo_num_snapshots", type=int, default=4,
      help="--loss_type sspo: snapshots kept besides the initial weights (oldest dropped first)")
    a("--sspo_sample_steps", type=int, default=10, help="--loss_type sspo: DDIM steps of the self-sampler")
    a("--sspo_guidance_scale", type=float, default=3.0,
      help="--loss_type sspo: classifier-free guidance scale of the self-sampler")
    a("--cuda_graph", action="store_true",
      help="capture the whole training step in one CUDA graph after 3 eager warm-up steps and "
           "replay it (one process, CUDA only; fp16 captures forward and backward only)")
    a("--checkpointing_steps", type=int, default=500)
    a("--checkpoints_total_limit", type=int, default=None)
    a("--resume_from_checkpoint", default=None, help="a checkpoint directory or 'latest'")
    a("--output_dir", default="fastpref-output")
    a("--seed", type=int, default=0)
    a("--report_to", default="tensorboard", choices=("tensorboard", "csv", "all", "none"),
      help="CSV metrics and curves.png are always written; tensorboard adds event files")
    a("--logging_steps", type=int, default=1)
    return p


def beta_dpo_message(beta_dpo: float) -> str:
    """Why ``--beta_dpo`` is refused and which ``--beta`` reproduces each upstream convention."""
    return (f"--beta_dpo is not accepted: fastpref's --beta follows the official Diffusion-DPO "
            f"convention, loss = -log sigmoid(-0.5 * beta * (...)). For --beta_dpo {beta_dpo:g} copied "
            f"from diffusers' train_diffusion_dpo.py (SD1.5, no 0.5 factor) pass --beta {2 * beta_dpo:g}; "
            f"from diffusers' train_diffusion_dpo_sdxl.py, SalesforceAIResearch/DiffusionDPO or "
            f"huaishengzhu/DSPO pass --beta {beta_dpo:g}.")


def _positive(name: str, value, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"--{name}: expected {'>= 0' if allow_zero else '> 0'}, got {value}")


def parse_args(argv: list[str] | None = None, defaults: dict | None = None) -> argparse.Namespace:
    """Parse and check the flags that need no file access; ValueError names the flag.
    ``defaults`` (flag name -> value) replace the parser's defaults; ``argv`` overrides them."""
    parser = build_parser()
    parser.set_defaults(**(defaults or {}))
    args = parser.parse_args(argv)
    if args.beta_dpo is not None:
        raise ValueError(beta_dpo_message(args.beta_dpo))
    if args.loss_type not in LOSS_TYPES:
        raise ValueError(f"--loss_type: expected one of {sorted(LOSS_TYPES)}, got {args.loss_type!r}")
    if args.dataset_name and args.train_data_dir and args.dataset_name != args.train_data_dir:
        raise ValueError(f"--dataset_name and --train_data_dir: give one, got {args.dataset_name!r} "
                         f"and {args.train_data_dir!r}")
    args.data_argument = "--dataset_name" if args.dataset_name else "--train_data_dir"
    args.data_path = args.dataset_name or args.train_data_dir or str(DEFAULT_DATA)
    for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps",
                 "learning_rate", "checkpointing_steps", "rank", "logging_steps", "resolution",
                 "checkpoints_total_limit", "rpo_tau", "sspo_snapshot_steps", "sspo_sample_steps"):
        _positive(name, getattr(args, name))
    for name in ("lr_warmup_steps", "max_grad_norm", "adam_weight_decay", "adam_epsilon", "sspo_guidance_scale",
                 "sspo_num_snapshots"):
        _positive(name, getattr(args, name), allow_zero=True)
    if args.beta is not None and not args.beta > 0:
        raise ValueError(f"--beta: expected > 0, got {args.beta}")
    return args
