"""NoiseSequenceRNN_v3: predicts the golden-noise sequence x'_1 ... x'_n from the initial noise x_T and a prompt.

Per step: a ResNet encoder (GroupNorm, SiLU) reads the current noise; its pooled feature and the projected
prompt embedding drive a GRU; a U-Net-style decoder with full-resolution skip paths from the encoder, FiLM-
conditioned on the text and the GRU output, predicts the *change*: mean = x_prev + delta_scale * head(...).
The change head starts at zero, so an untrained model is exactly the identity baseline x'_k = x'_{k-1}.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from golden_noise.export import FINAL_STEM, ExportableModel

__all__ = ["DATA_FIELDS", "FINAL_STEM", "NoiseSequenceRNNConfig", "NoiseSequenceRNN_v3"]

LOGVAR_MIN, LOGVAR_MAX = -20.0, 5.0
# config fields that describe the data, not the architecture: training sets them from the dataset
DATA_FIELDS = ("latent_channels", "noise_resolution", "text_embed_dim", "delta_scale")


@dataclass
class NoiseSequenceRNNConfig:
    """Every architecture choice of NoiseSequenceRNN_v3; the model's only constructor argument."""

    latent_channels: int = field(default=4, metadata={"help": "C of the noise (SDXL: 4)"})
    noise_resolution: int = field(default=128, metadata={"help": "H = W of the noise (SDXL 1024 px: 128)"})
    text_embed_dim: int = field(default=1280, metadata={
        "help": "P of the text embedding (SDXL pooled: 1280; see generate_npd_series.py --text_embedding)"})
    text_proj_dim: int = field(default=256, metadata={"help": "size the text embedding is projected to"})
    cnn_base_filters: int = field(default=64, metadata={
        "help": "channels of the first CNN stage (doubled per stage)"})
    cnn_num_blocks: list[int] = field(default_factory=lambda: [2, 2, 2, 2], metadata={
        "help": "residual blocks per CNN stage; every stage after the first halves the resolution"})
    cnn_max_filters: int = field(default=512, metadata={"help": "cap on the channels of a CNN stage"})
    cnn_feat_dim: int = field(default=512, metadata={"help": "pooled CNN feature size fed to the GRU"})
    gru_hidden_size: int = field(default=1024, metadata={"help": "GRU hidden size"})
    gru_num_layers: int = field(default=2, metadata={"help": "GRU layers"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on the GRU input/output and between layers"})
    norm_groups: int = field(default=32, metadata={
        "help": "GroupNorm groups (reduced to a divisor of the channels)"})
    predict_variance: bool = field(default=False, metadata={
        "help": "also predict a log-variance and train with the Gaussian NLL instead of MSE"})
    delta_scale: float = field(default=0.05, metadata={
        "help": "typical RMS of the golden change; the head predicts change / delta_scale"})

    def __post_init__(self):
        self.cnn_num_blocks = [int(b) for b in self.cnn_num_blocks]
        if not self.cnn_num_blocks or any(b < 1 for b in self.cnn_num_blocks):
            raise ValueError(f"cnn_num_blocks must be a non-empty list of positive ints, got {self.cnn_num_blocks}")
        down = 2 ** (len(self.cnn_num_blocks) - 1)
        if self.noise_resolution % down:
            stages = len(self.cnn_num_blocks)
            raise ValueError(f"noise_resolution {self.noise_resolution} must be divisible by {down} "
                             f"({stages} encoder stages halve it {stages - 1} times)")
        for name in ("latent_channels", "noise_resolution", "text_embed_dim", "text_proj_dim", "cnn_base_filters",
                     "cnn_feat_dim", "gru_hidden_size", "gru_num_layers", "norm_groups"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.delta_scale > 0:
            raise ValueError(f"delta_scale must be positive, got {self.delta_scale}")

    def stage_channels(self) -> list[int]:
        return [min(self.cnn_base_filters * 2 ** i, self.cnn_max_filters) for i in range(len(self.cnn_num_blocks))]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "NoiseSequenceRNNConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}")
        return cls(**d)


def _groups(channels: int, wanted: int) -> int:
    return math.gcd(channels, wanted)


class FiLM(nn.Module):
    """Feature-wise scale and shift from a conditioning vector; starts as the identity."""

    def __init__(self, cond_dim: int, channels: int):
        super().__init__()
        self.proj = nn.Linear(cond_dim, 2 * channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.proj(cond)[:, :, None, None].chunk(2, dim=1)  # (N, ch, 1, 1) each
        return h * (1 + scale) + shift


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a residual path; optional FiLM conditioning after the second norm."""

    def __init__(self, c_in: int, c_out: int, groups: int, cond_dim: int | None = None):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in, groups), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(c_out, groups), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.film = FiLM(cond_dim, c_out) if cond_dim else None
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.norm2(h)
        if self.film is not None:
            h = self.film(h, cond)
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class Encoder(nn.Module):
    """Stem conv + stages of residual blocks; every stage but the first halves the resolution."""

    def __init__(self, cfg: NoiseSequenceRNNConfig):
        super().__init__()
        chans = cfg.stage_channels()
        self.stem = nn.Conv2d(cfg.latent_channels, chans[0], 3, padding=1)
        self.downs = nn.ModuleList()
        self.stages = nn.ModuleList()
        c_prev = chans[0]
        for i, (c, n) in enumerate(zip(chans, cfg.cnn_num_blocks)):
            self.downs.append(nn.Conv2d(c_prev, c_prev, 3, stride=2, padding=1) if i > 0 else nn.Identity())
            self.stages.append(nn.ModuleList(
                [ResBlock(c_prev if j == 0 else c, c, cfg.norm_groups) for j in range(n)]))
            c_prev = c
        self.out_norm = nn.GroupNorm(_groups(c_prev, cfg.norm_groups), c_prev)
        self.feat = nn.Linear(c_prev, cfg.cnn_feat_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x (N, C, H, W) -> pooled feature (N, F) and per-stage maps [(N, c_i, H/2^i, W/2^i)]."""
        h = self.stem(x)
        skips = []
        for down, blocks in zip(self.downs, self.stages):
            h = down(h)
            for block in blocks:
                h = block(h)
            skips.append(h)
        pooled = F.silu(self.out_norm(h)).mean(dim=(2, 3))  # (N, c_last)
        return self.feat(pooled), skips


class Decoder(nn.Module):
    """U-Net decoder from the deepest encoder map up to full resolution, concatenating the encoder's skips;
    every block is FiLM-conditioned on [GRU output, text]."""

    def __init__(self, cfg: NoiseSequenceRNNConfig, cond_dim: int):
        super().__init__()
        chans = cfg.stage_channels()
        g = cfg.norm_groups
        self.mid = ResBlock(chans[-1], chans[-1], g, cond_dim)
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        c_prev = chans[-1]
        for i in reversed(range(len(chans) - 1)):
            self.ups.append(nn.Conv2d(c_prev, chans[i], 3, padding=1))
            self.blocks.append(ResBlock(2 * chans[i], chans[i], g, cond_dim))
            c_prev = chans[i]
        self.out_norm = nn.GroupNorm(_groups(c_prev, g), c_prev)

    def forward(self, skips: list[torch.Tensor], cond: torch.Tensor) -> torch.Tensor:
        """skips [(N, c_i, H_i, W_i)], cond (N, D) -> (N, c_0, H, W)."""
        h = self.mid(skips[-1], cond)
        for up, block, skip in zip(self.ups, self.blocks, reversed(skips[:-1])):
            h = up(F.interpolate(h, size=skip.shape[-2:], mode="nearest"))
            h = block(torch.cat([h, skip], dim=1), cond)
        return F.silu(self.out_norm(h))


class NoiseSequenceRNN_v3(ExportableModel, nn.Module):
    """CNN encoder -> GRU over steps (with the prompt) -> FiLM U-Net decoder predicting the next noise.

    `save_pretrained(stem, extra)` / `from_pretrained(path)`: the sealed export of golden_noise.export."""

    model_type = "NoiseSequenceRNN_v3"
    config_class = NoiseSequenceRNNConfig

    def __init__(self, config: NoiseSequenceRNNConfig):
        super().__init__()
        self.config = config
        cfg = config
        self.text_proj = nn.Sequential(nn.Linear(cfg.text_embed_dim, cfg.text_proj_dim), nn.SiLU(),
                                       nn.Linear(cfg.text_proj_dim, cfg.text_proj_dim))
        self.encoder = Encoder(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.gru = nn.GRU(cfg.cnn_feat_dim + cfg.text_proj_dim, cfg.gru_hidden_size, cfg.gru_num_layers,
                          batch_first=True, dropout=cfg.dropout if cfg.gru_num_layers > 1 else 0.0)
        cond_dim = cfg.gru_hidden_size + cfg.text_proj_dim
        self.decoder = Decoder(cfg, cond_dim)
        c0 = cfg.stage_channels()[0]
        self.mean_head = nn.Conv2d(c0, cfg.latent_channels, 3, padding=1)
        nn.init.zeros_(self.mean_head.weight)  # start at the identity baseline: mean = x_prev
        nn.init.zeros_(self.mean_head.bias)
        self.logvar_head = nn.Conv2d(c0, cfg.latent_channels, 3, padding=1) if cfg.predict_variance else None
        if self.logvar_head is not None:
            nn.init.zeros_(self.logvar_head.weight)  # start at variance delta_scale^2
            nn.init.constant_(self.logvar_head.bias, 2 * math.log(cfg.delta_scale))

    # ---- core -------------------------------------------------------------------------------------------
    def _step_outputs(self, x: torch.Tensor, skips: list[torch.Tensor], cond: torch.Tensor):
        """Decode N frames: x (N, C, H, W), cond (N, D) -> mean (N, C, H, W), logvar (N, C, H, W) or None."""
        h = self.decoder(skips, cond)
        mean = x + self.config.delta_scale * self.mean_head(h)
        logvar = None
        if self.logvar_head is not None:
            logvar = self.logvar_head(h).clamp(LOGVAR_MIN, LOGVAR_MAX)
        return mean, logvar

    def forward(self, x_prev: torch.Tensor, text: torch.Tensor, hidden: torch.Tensor | None = None,
                return_hidden: bool = False):
        """Teacher forcing in one pass.

        x_prev (B, T, C, H, W) = [x_T, x'_1, ..., x'_{T-1}], text (B, P) ->
        (mean (B, T, C, H, W), logvar (B, T, C, H, W) or None) predicting x'_1 ... x'_T.
        """
        B, T, C, H, W = x_prev.shape
        frames = x_prev.reshape(B * T, C, H, W)  # (B*T, C, H, W)
        feat, skips = self.encoder(frames)  # (B*T, F), [(B*T, c_i, H_i, W_i)]
        t = self.text_proj(text.to(feat.dtype))  # (B, Tp)
        t_seq = t[:, None, :].expand(B, T, t.shape[-1])  # (B, T, Tp)
        gru_in = self.drop(torch.cat([feat.reshape(B, T, -1), t_seq], dim=-1))  # (B, T, F + Tp)
        out, hidden = self.gru(gru_in, hidden)  # (B, T, Hg), (L, B, Hg)
        cond = torch.cat([self.drop(out), t_seq], dim=-1).reshape(B * T, -1)  # (B*T, Hg + Tp)
        mean, logvar = self._step_outputs(frames, skips, cond)
        mean = mean.reshape(B, T, C, H, W)
        logvar = logvar.reshape(B, T, C, H, W) if logvar is not None else None
        if return_hidden:
            return mean, logvar, hidden
        return mean, logvar

    @torch.no_grad()
    def generate_sequence(self, x_T: torch.Tensor, text: torch.Tensor, n: int, sample: bool = False,
                          generator: torch.Generator | None = None) -> torch.Tensor:
        """Autoregressive rollout: x_T (B, C, H, W), text (B, P) -> (B, n, C, H, W) = x'_1 ... x'_n.

        Each step feeds the previous prediction (its mean, or a sample from the predicted Gaussian with
        `sample=True`) back in; the GRU state is carried between steps. Runs with eval-mode semantics.
        """
        was_training = self.training
        self.eval()
        try:
            x = x_T[:, None]  # (B, 1, C, H, W)
            hidden, outs = None, []
            for _ in range(n):
                mean, logvar, hidden = self(x, text, hidden, return_hidden=True)
                nxt = mean
                if sample and logvar is not None:
                    # drawn on the generator's device (a CPU generator works for a CUDA model too)
                    where = generator.device if generator is not None else mean.device
                    noise = torch.randn(mean.shape, generator=generator, device=where).to(mean.device, mean.dtype)
                    nxt = mean + torch.exp(0.5 * logvar.to(mean.dtype)) * noise
                outs.append(nxt[:, 0])
                x = nxt
            return torch.stack(outs, dim=1)  # (B, n, C, H, W)
        finally:
            self.train(was_training)
