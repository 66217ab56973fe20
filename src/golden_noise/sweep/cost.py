"""What a sweep cell costs, counted rather than estimated: model rows through the pipeline's denoiser (a forward
hook: one row = one sample through the UNet or transformer once, so CFG counts 2 per step), and a learned noise
model's FLOPs (the RNN's rollout, the direct model's and NPNet's one forward) as a fraction of one denoiser
evaluation (both counted with torch.utils.flop_counter on the meta device: no weights, no memory; attention is
counted in its math form on every device, whereas on a CPU FlopCounterMode misses the fused attention kernel; an
SVD, which FlopCounterMode does not count, is counted as Golub-Reinsch's 4m^2 n + 8mn^2 + 9n^3 for an m x n matrix
with both singular-vector sets, Golub & Van Loan, Matrix Computations, table 5.5)."""
from __future__ import annotations

import torch
from ..diffusion import encode_prompts, family_of
from ..model import model_class



def denoiser(pipe):
    """The pipeline's denoising network: its UNet, else its transformer (SD3 / FLUX)."""
    return family_of(pipe).denoiser


def svd_flops(a_shape, full_matrices: bool = True, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of an SVD with U and V of a batch of m x n matrices (m >= n after transposing): 4m^2 n + 8mn^2 + 9n^3
    each (Golub-Reinsch, Golub & Van Loan table 5.5)."""
    *batch, m, n = a_shape
    m, n = max(m, n), min(m, n)
    count = 1
    for b in batch:
        count *= b
    return count * (4 * m * m * n + 8 * m * n * n + 9 * n ** 3)


def count_flops(fn, *args, **kwargs) -> int:
    """FLOPs of `fn(*args, **kwargs)` counted by torch.utils.flop_counter.FlopCounterMode (SVDs by `svd_flops`)."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {torch.ops.aten._linalg_svd: svd_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter, torch.no_grad():
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
    net = denoiser(pipe)
    cond = encode_prompts(pipe, [""], height=height, width=width, with_uncond=False)
    with torch.device("meta"):
        meta_net = type(net).from_config(net.config).eval()  # float32: a FLOP count does not depend on the dtype
    x = torch.empty(1, *latent_shape, device="meta")  # (1, C, H, W)
    t = int(pipe.scheduler.config.num_train_timesteps) - 1
    return count_flops(meta_net, x, t, **_to_meta(cond.branch("cond")), return_dict=False)


def rollout_flops(gn, num_steps: int) -> int:
    """FLOPs of a learned noise for one sample (the RNN's rollout of `num_steps` steps; a one-step model's single
    forward), on a meta copy of the export's architecture (`gn`: a GoldenNoise)."""
    cls = model_class(gn.model_type)
    config = cls.config_class.from_dict(gn.model_config)
    with torch.device("meta"):
        model = cls(config).eval()
    x = torch.empty(1, *gn.latent_shape, device="meta")  # (1, C, H, W)
    text = torch.empty(1, config.text_embed_dim, device="meta")  # (1, P)
    return count_flops(model.generate_sequence, x, text, num_steps)


def rollout_unet_fractions(learned: dict, pipe, latent_shape, height: int, width: int) -> dict[tuple[str, int], float]:
    """{(method, n): FLOPs of the method's noise at n / FLOPs of one denoiser evaluation}, for `learned`:
    {method: (GoldenNoise, [n, ...])}."""
    unet = denoiser_forward_flops(pipe, latent_shape, height, width)
    return {(method, int(n)): rollout_flops(gn, int(n)) / unet for method, (gn, ns) in learned.items() for n in ns}
