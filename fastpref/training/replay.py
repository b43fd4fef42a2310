"""SSPO's Random Checkpoint Replay and its self-sampler.

The pool holds the initial trainable weights (always) and a snapshot every
``--sspo_snapshot_steps`` optimizer steps, at most ``--sspo_num_snapshots`` of them (the oldest
periodic one is dropped first; the initial weights stay). Each step one entry is picked
uniformly, with a generator seeded by ``(seed, step)`` so a resumed run picks the same, and
loaded into the replay model: a frozen copy of the policy denoiser (LoRA layers included) in the
weight dtype. That model is SSPO's reference and samples the self-sample that fills each pair's
loser slot: a few-step run of the family's sampler (SD: DDIM) with classifier-free guidance on
the winner's prompt, decoded and VAE-encoded like a dataset image.

Memory: the pool stores the trainable tensors once per entry (LoRA: a few MB; full fine-tuning:
a denoiser per entry, in the weight dtype), plus the replay model itself.
"""

import torch
from safetensors.torch import load_file

REPLAY_FILE = "replay.safetensors"


class CheckpointReplay:
    """The snapshot pool of Random Checkpoint Replay and the replay model it loads into."""

    def __init__(
        self,
        policy: torch.nn.Module,
        replay_model: torch.nn.Module,
        *,
        snapshot_steps: int,
        num_snapshots: int,
        seed: int,
    ):
        self.replay_model, self.snapshot_steps, self.num_snapshots, self.seed = (
            replay_model,
            snapshot_steps,
            num_snapshots,
            seed,
        )
        self.names = [n for n, p in policy.named_parameters() if p.requires_grad]
        self.targets = dict(replay_model.named_parameters())
        missing = [n for n in self.names if n not in self.targets]
        if missing:
            raise ValueError(f"replay model: lacks the trainable parameters {missing[:4]}")
        self.steps: list[int] = []  # step of each pool entry, initial weights first
        self.pool: list[dict[str, torch.Tensor]] = []
        self.add(policy, 0)

    def add(self, policy: torch.nn.Module, step: int) -> None:
        """Snapshot ``policy``'s trainable weights (in the replay model's dtypes) as of ``step``."""
        params = dict(policy.named_parameters())
        self.pool.append({n: params[n].detach().to(self.targets[n].dtype, copy=True) for n in self.names})
        self.steps.append(step)
        if len(self.pool) > 1 + self.num_snapshots:  # entry 0, the initial weights, always stays
            del self.pool[1], self.steps[1]

    def after_step(self, policy: torch.nn.Module, step: int) -> None:
        """Take a snapshot when optimizer step ``step`` is a multiple of ``snapshot_steps``."""
        if step % self.snapshot_steps == 0:
            self.add(policy, step)

    def pick(self, step: int) -> int:
        """The pool entry replayed at ``step``: uniform, reproducible from (seed, step)."""
        g = torch.Generator().manual_seed(self.seed * 7_919 + step)
        return int(torch.randint(len(self.pool), (), generator=g))  # host-ok: CPU generator

    @torch.no_grad()
    def load(self, index: int) -> None:
        """Copy pool entry ``index`` into the replay model's parameters."""
        for name, value in self.pool[index].items():
            self.targets[name].copy_(value)

    def state(self) -> tuple[dict[str, torch.Tensor], list[int]]:
        """Tensors (``"<entry>/<name>"``) and entry steps, for a checkpoint."""
        tensors = {f"{i}/{n}": v for i, entry in enumerate(self.pool) for n, v in entry.items()}
        return tensors, list(self.steps)

    def restore(self, path, steps: list[int]) -> None:
        """Inverse of ``state``: the pool saved in checkpoint directory ``path``."""
        tensors = load_file(path / REPLAY_FILE)
        pool = [{} for _ in steps]
        for key, value in tensors.items():
            index, name = key.split("/", 1)
            pool[int(index)][name] = value.to(self.targets[name].device)
        if any(set(entry) != set(self.names) for entry in pool):
            raise ValueError(
                f"--resume_from_checkpoint: {path / REPLAY_FILE} does not match the trainable parameters of this run"
            )
        self.pool, self.steps = pool, list(steps)


@torch.no_grad()
def ddim_sample(
    unet,
    scheduler_config,
    embeddings: torch.Tensor,
    negative: torch.Tensor,
    start: torch.Tensor,
    *,
    num_steps: int,
    guidance_scale: float,
) -> torch.Tensor:
    """Latents ``[B, C, h, w]`` sampled by ``num_steps`` DDIM steps from ``start`` noise,
    classifier-free guided by ``embeddings`` ``[B, L, D]`` against ``negative`` ``[1, L, D]``.
    ``unet(x, t, emb)`` returns the model output the scheduler config's prediction type names."""
    from diffusers import DDIMScheduler  # here: importing the trainer stays fast

    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(num_steps, device=start.device)
    latents = start * scheduler.init_noise_sigma
    both = torch.cat([negative.expand_as(embeddings), embeddings])
    for t in scheduler.timesteps:
        uncond, cond = unet(torch.cat([latents, latents]), t, both).float().chunk(2)
        guided = uncond + guidance_scale * (cond - uncond)
        latents = scheduler.step(guided, t, latents).prev_sample
    return latents


def self_sampler(predict, family, *, num_steps: int, guidance_scale: float):
    """The ``sample_losers(winners, start, latent_eps)`` of ``batches.winner_batch``: samples of
    ``family.sample`` (SD: DDIM) for the winners' prompts by ``predict(x, t, emb, pooled,
    extra=None)`` (the replay model's forward), decoded and encoded back like a dataset image
    (``[B, *latent_shape]`` float32 latents). A family with extra conditioning (``winners.extra``
    ``[B, E]``, ``E > 0``: SDXL's time ids) samples with the winners' extra (keyword ``extra``);
    the others are called without it."""
    negative, negative_pooled = family.encode_prompts([""])

    def sample_losers(winners, start: torch.Tensor, latent_eps: torch.Tensor) -> torch.Tensor:
        extra = getattr(winners, "extra", None)
        # a shape (host metadata), not a tensor value: families with no extra conditioning keep their signature
        conditioning = {"extra": extra} if extra is not None and extra.shape[-1] > 0 else {}
        latents = family.sample(
            predict,
            winners.embeddings,
            winners.pooled,
            negative,
            negative_pooled,
            start,
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            **conditioning,
        )
        pixels = family.decode_latents(latents)
        return family.encode_images(pixels.clamp(-1, 1), latent_eps)

    return sample_losers
