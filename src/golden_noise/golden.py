"""The golden step of NPNet (arXiv:2411.09502): one denoising step with strong guidance followed by one inversion
step with weak guidance, built here from what a pipeline's family exposes (diffusion.base): its guided `predict`
and its schedule. UNet families (epsilon or v-prediction): DDIM denoise and DDIM inversion, both at
t0 = timesteps[0] of an N-step DDIM schedule built from the pipeline's scheduler config (`GoldenStep`). Flow
matching: one Euler step down the family's sigmas and one back up (`FlowGoldenStep`, a contract). `golden_step(pipe)`
picks the step by the family's prediction type; the families know nothing of this module."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from .cli import check_fields, setting
from .diffusion import Conditioning, ModelCounter, family_of
from .errors import UserError


@dataclass
class GoldenConfig:
    """Parameters of the golden step (NPNet's SDXL defaults), with their ranges (golden_noise.cli.setting)."""

    schedule_steps: int = setting(10, "N: length of the golden step's schedule (DDIM for UNet models, the pipeline's "
                                  "own for flow matching); the step runs at t0 = its first timestep", min=1)
    denoise_guidance_scale: float = setting(5.5, "w_l: CFG scale of the golden step's denoising step, eps_u + w "
                                            "(eps_c - eps_u) for any w >= 0 (1: the conditional prediction alone, 0: "
                                            "the unconditional one)", min=0)
    inversion_guidance_scale: float = setting(1.0, "w_w: CFG scale of the golden step's inversion step, same rule as "
                                              "w_l (1 and 0 need one UNet branch, other values both)", min=0)

    def check(self) -> "GoldenConfig":
        """A UserError naming the flag of a value out of range (a negative or non-finite scale, N < 1)."""
        check_fields(self)
        return self

    def to_dict(self) -> dict:
        return asdict(self)


# a family's guided prediction: (x (B, C, h, w), t, cond, guidance scale, counter) -> float32 (B, C, h, w)
Predict = Callable[[torch.Tensor, Any, Conditioning, float, "ModelCounter | None"], torch.Tensor]


class _Sequence:
    """Applying a golden step n times."""

    @torch.no_grad()
    def sequence(self, x: torch.Tensor, cond: Conditioning, n: int) -> torch.Tensor:
        """Apply the step n times: (B, C, H, W) -> (B, n, C, H, W) holding x'_1 ... x'_n."""
        out = []
        for _ in range(n):
            x = self(x, cond)
            out.append(x)
        return torch.stack(out, dim=1)


class GoldenStep(_Sequence):
    """x' = DDIMInverse.step(eps_cfg(x_prev, t0, w_w), t0, x_prev) with x_prev = DDIM.step(eps_cfg(x, t0, w_l), t0, x).

    With epsilon prediction x' = x - c (eps_l - eps_w), c = sqrt(1-a_t0) - sqrt(a_t0/a_prev) sqrt(1-a_prev); with
    v_prediction both schedulers convert v themselves (no such closed form). `predict` is the family's guided
    prediction (DiffusionFamily.predict), `scheduler_config` the pipeline's own. Latents are kept in float32; the
    UNet runs in its own dtype.
    """

    def __init__(self, predict: Predict, scheduler_config, config: GoldenConfig | None = None):
        from diffusers import DDIMInverseScheduler, DDIMScheduler

        self.predict = predict
        self.config = config or GoldenConfig()
        # clip_sample/thresholding would clip the x0 prediction of unit-variance latents: never wanted here.
        overrides = {"clip_sample": False, "thresholding": False}
        self.ddim = DDIMScheduler.from_config(scheduler_config, **overrides)
        self.inverse = DDIMInverseScheduler.from_config(scheduler_config, clip_sample=False)
        self.ddim.set_timesteps(self.config.schedule_steps)
        self.inverse.set_timesteps(self.config.schedule_steps)
        self.t0 = int(self.ddim.timesteps[0])
        if self.t0 >= self.ddim.config.num_train_timesteps:
            raise UserError(f"--schedule_steps {self.config.schedule_steps} puts t0 at {self.t0}, past the model's "
                            f"{self.ddim.config.num_train_timesteps} training timesteps (steps_offset "
                            f"{self.ddim.config.steps_offset}): use fewer schedule steps")
        self.t_prev = self.t0 - self.ddim.config.num_train_timesteps // self.config.schedule_steps
        self.counter = ModelCounter()

    @property
    def coefficient(self) -> float | None:
        """c of the closed form x' = x - c (eps_l - eps_w); None unless the model predicts epsilon."""
        if self.ddim.config.prediction_type != "epsilon":
            return None
        a = self.ddim.alphas_cumprod
        a_t = a[self.t0].item()
        a_p = a[self.t_prev].item() if self.t_prev >= 0 else self.ddim.final_alpha_cumprod.item()
        return (1 - a_t) ** 0.5 - (a_t / a_p) ** 0.5 * (1 - a_p) ** 0.5

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """One golden step: (B, C, H, W) float32 -> (B, C, H, W) float32."""
        x = x.float()
        cfg = self.config
        eps_l = self.predict(x, self.t0, cond, cfg.denoise_guidance_scale, self.counter)
        x_prev = self.ddim.step(eps_l, self.t0, x, eta=0.0).prev_sample
        eps_w = self.predict(x_prev, self.t0, cond, cfg.inversion_guidance_scale, self.counter)
        return self.inverse.step(eps_w, self.t0, x_prev).prev_sample.float()

    def record(self) -> dict:
        """The schedule's facts run_config records beside the GoldenConfig."""
        c = self.coefficient
        return {"t0": self.t0, "t_prev": self.t_prev, "coefficient": round(c, 8) if c is not None else None}


class FlowGoldenStep(_Sequence):
    """The rectified-flow golden step (a contract, so results compare across implementations): with the pipeline
    scheduler's set_timesteps(N) giving sigmas s0 > s1 and timesteps t0, t1,
        x_prev = x      + (s1 - s0) v(x,      t0, w_l)
        x'     = x_prev + (s0 - s1) v(x_prev, t1, w_w)      v(z, t, w) = v_u + w (v_c - v_u)
    (FLUX: v(z, t, w) with the guidance embedding set to w). Closed form x' = x - (s0 - s1) (v_l - v_w).
    `predict` is the family's guided prediction, `sigmas` and `timesteps` its schedule (FlowMatchingFamily.schedule).
    Latents are kept in float32; the transformer runs in its own dtype."""

    def __init__(self, predict: Predict, sigmas: torch.Tensor, timesteps: torch.Tensor,
                 config: GoldenConfig | None = None):
        self.predict = predict
        self.config = config or GoldenConfig()
        if len(timesteps) < 2:
            raise UserError(f"--schedule_steps {self.config.schedule_steps}: the flow-matching golden step needs two "
                            "timesteps (t0, t1) of the schedule: use at least 2")
        self.sigma0, self.sigma1 = float(sigmas[0]), float(sigmas[1])
        self.t0, self.t1 = timesteps[0], timesteps[1]  # 0-d tensors, as the pipeline passes them
        self.counter = ModelCounter()

    @property
    def coefficient(self) -> float:
        """c of the closed form x' = x - c (v_l - v_w): s0 - s1."""
        return self.sigma0 - self.sigma1

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """One golden step: (B, C, H, W) float32 -> (B, C, H, W) float32."""
        x = x.float()
        cfg, s0, s1 = self.config, self.sigma0, self.sigma1
        v_l = self.predict(x, self.t0, cond, cfg.denoise_guidance_scale, self.counter)  # (B, C, H, W)
        x_prev = x + (s1 - s0) * v_l
        v_w = self.predict(x_prev, self.t1, cond, cfg.inversion_guidance_scale, self.counter)
        return x_prev + (s0 - s1) * v_w

    def record(self) -> dict:
        """The schedule's facts run_config records beside the GoldenConfig."""
        return {"t0": float(self.t0), "t1": float(self.t1), "sigma0": self.sigma0, "sigma1": self.sigma1,
                "coefficient": round(self.coefficient, 8)}


def golden_step(pipe, config: GoldenConfig | None = None, height: int | None = None, width: int | None = None):
    """The golden step of `pipe`'s family, built from what the family exposes: its guided `predict`, and its
    schedule (flow matching: sigmas and timesteps for this image size; UNets: the pipeline's scheduler config)."""
    family, config = family_of(pipe), config or GoldenConfig()
    if family.prediction_type == "flow":
        sigmas, timesteps = family.schedule(config.schedule_steps, height, width)
        return FlowGoldenStep(family.predict, sigmas, timesteps, config)
    return GoldenStep(family.predict, family.scheduler_config, config)
