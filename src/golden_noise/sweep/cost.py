"""What a sweep cell costs, counted rather than estimated: model rows through the pipeline's denoiser (a forward
hook: one row = one sample through the UNet or transformer once, so CFG counts 2 per step), and the RNN
rollout's FLOPs as a fraction of one denoiser evaluation (both counted with torch.utils.flop_counter on the
meta device: no weights, no memory; attention is counted in its math form on every device, whereas on a CPU
FlopCounterMode misses the fused attention kernel)."""
from __future__ import annotations

import torch



def denoiser(pipe):
    """The pipeline's denoising network: its UNet, else its transformer (SD3 / FLUX)."""
    from ..diffusion import family_of

    return family_of(pipe).denoiser


def count_flops(fn, *args, **kwargs) -> int:
    """FLOPs of `fn(*args, **kwargs)` counted by torch.utils.flop_counter.FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def _to_meta(value):
    if isinstance(value, torch.Tensor):
        return value.to("meta")
    if isinstance(value, dict):
        return {k: _to_meta(v) for k, v in value.items()}
    return value


def denoiser_forward_flops(pipe, latent_shape, height: int, width: int) -> int:
    """FLOPs of one conditional denoiser forward at batch 1 for latents (C, H, W), on a meta copy of its
    architecture (the conditioning comes from encoding an empty prompt with the real text encoders)."""
    from ..diffusion import encode_prompts

    net = denoiser(pipe)
    cond = encode_prompts(pipe, [""], height=height, width=width, with_uncond=False)
    with torch.device("meta"):
        meta_net = type(net).from_config(net.config).eval()  # float32: a FLOP count does not depend on the dtype
    x = torch.empty(1, *latent_shape, device="meta")  # (1, C, H, W)
    t = int(pipe.scheduler.config.num_train_timesteps) - 1
    return count_flops(meta_net, x, t, **_to_meta(cond.branch("cond")), return_dict=False)


def rollout_flops(gn, num_steps: int) -> int:
    """FLOPs of the RNN's rollout of `num_steps` steps for one sample, on a meta copy of its architecture."""
    from ..model.rnn_seq_model_v3 import NoiseSequenceRNN_v3, NoiseSequenceRNNConfig

    config = NoiseSequenceRNNConfig.from_dict(gn.model_config)
    with torch.device("meta"):
        model = NoiseSequenceRNN_v3(config).eval()
    x = torch.empty(1, *gn.latent_shape, device="meta")  # (1, C, H, W)
    text = torch.empty(1, config.text_embed_dim, device="meta")  # (1, P)
    return count_flops(model.generate_sequence, x, text, num_steps)


def rollout_unet_fractions(gn, pipe, num_gen_steps, latent_shape, height: int, width: int) -> dict[int, float]:
    """{n: rollout FLOPs of n steps / FLOPs of one denoiser evaluation} for each rollout length n."""
    unet = denoiser_forward_flops(pipe, latent_shape, height, width)
    return {int(n): rollout_flops(gn, int(n)) / unet for n in num_gen_steps}
