"""NPNet, the noise prompt network of "Golden Noise for Diffusion Models: A Learning Framework" (Zhou et al.,
arXiv:2411.09502), re-implemented from the paper and its public code: x_T (+ the prompt) -> the golden noise in one
forward, with the state-dict layout of the released SDXL checkpoint (`sdxl.pth`), so its weights load here.

    text_emb = AdaGroupNorm(x_T; prompt)                     GroupNorm(1 group) of x_T, scale and shift from the text
    golden   = SVD(x_T) + (2 sigmoid(alpha) - 1) text_emb + beta Swin(x_T + text_emb)

- SVD branch (`unet_svd`): the 4 latent channels tiled 2 x 2 into one (2H, 2W) matrix, its SVD U diag(s) V; MLPs of
  U^T, V and s, self-attention over the rows, mean over them, an MLP -> new singular values s + delta; output
  U diag(s + delta) V untiled. (Its BatchNorm `bn` is in the checkpoint but unused by the forward, as in NPNet.)
- Swin branch (`unet_embedding`): the latent resized (nearest) to the Swin's image size, 4 -> 3 channels by a 1x1
  conv, timm's SwinTransformer features (B, h, w, C), resized (nearest) as if h were channels to the latent size,
  h -> 4 channels by a 1x1 conv: NPNet's wiring, kept as it is so its weights mean the same here.
- alpha and beta start at 0 (NPNet's training init), so an untrained model's output is the SVD branch alone.

Defaults are the released SDXL model's: 128 x 128 latents, SDXL's prompt_embeds (77 x 2048) flattened as the text
input (golden_noise.diffusion's `prompt_embeds` text embedding), Swin-T at 224 px (28.3M of its 30M parameters;
the Swin's ImageNet classifier head is kept, unused, because the checkpoint holds it). Trained on our data, the text
input is the dataset's text embedding and the sizes are the dataset's (`--model_type NPNet`).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from golden_noise.errors import UserError
from golden_noise.export import Export, ExportableModel, ExportFiles

MODEL_TYPE = "NPNet"
SDXL_TEXT_DIM = 77 * 2048
# the sub-dictionaries of NPNet's released checkpoint (torch.save of a dict) -> our submodule / parameter names
CHECKPOINT_PARTS = {"unet_svd": "unet_svd", "unet_embedding": "unet_embedding", "embeeding": "text_embedding"}
CHECKPOINT_SCALARS = {"alpha": "alpha", "beta": "beta"}
DATA_FIELDS = ("latent_channels", "noise_resolution", "text_embed_dim")


@dataclass
class NPNetConfig:
    """Every size of NPNet; the model's only constructor argument (defaults: the released SDXL model)."""

    latent_channels: int = field(default=4, metadata={"help": "C of the noise (NPNet tiles 4 channels 2 x 2)"})
    noise_resolution: int = field(default=128, metadata={"help": "H = W of the noise (SDXL 1024 px: 128)"})
    text_embed_dim: int = field(default=SDXL_TEXT_DIM, metadata={
        "help": "size of the text input (SDXL's prompt_embeds flattened: 77 x 2048)"})
    svd_hidden_dim: int = field(default=64, metadata={"help": "npnet: hidden size of the SVD branch's U and V MLPs"})
    svd_mlp_dim: int = field(default=1024, metadata={
        "help": "npnet: hidden size of the SVD branch's singular-value MLP"})
    svd_num_heads: int = field(default=8, metadata={"help": "npnet: attention heads of the SVD branch"})
    swin_img_size: int = field(default=224, metadata={"help": "npnet: image size the Swin branch resizes the noise to"})
    swin_patch_size: int = field(default=4, metadata={"help": "npnet: Swin patch size"})
    swin_embed_dim: int = field(default=96, metadata={"help": "npnet: Swin embedding width (doubled per stage)"})
    swin_depths: list[int] = field(default_factory=lambda: [2, 2, 6, 2], metadata={
        "help": "npnet: Swin blocks per stage"})
    swin_num_heads: list[int] = field(default_factory=lambda: [3, 6, 12, 24], metadata={
        "help": "npnet: Swin attention heads per stage"})
    swin_window_size: int = field(default=7, metadata={"help": "npnet: Swin attention window"})
    swin_num_classes: int = field(default=1000, metadata={
        "help": "npnet: classes of the Swin's (unused) classifier head; 1000 in the released checkpoint, 0: none"})
    swin_drop_path_rate: float = field(default=0.1, metadata={
        "help": "npnet: Swin stochastic depth in training (timm's default, which NPNet trained with)"})

    def __post_init__(self):
        self.swin_depths = [int(d) for d in self.swin_depths]
        self.swin_num_heads = [int(h) for h in self.swin_num_heads]
        if self.latent_channels != 4:
            raise ValueError(f"NPNet tiles 4 latent channels 2 x 2 into one matrix; got latent_channels "
                             f"{self.latent_channels}")
        for name in ("noise_resolution", "text_embed_dim", "svd_hidden_dim", "svd_mlp_dim", "svd_num_heads",
                     "swin_img_size", "swin_patch_size", "swin_embed_dim", "swin_window_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.swin_num_classes < 0:
            raise ValueError(f"swin_num_classes must not be negative, got {self.swin_num_classes}")
        if not self.swin_depths or len(self.swin_depths) != len(self.swin_num_heads):
            raise ValueError(f"swin_depths {self.swin_depths} and swin_num_heads {self.swin_num_heads} need one "
                             "entry per stage")
        if (2 * self.noise_resolution) % self.svd_num_heads:
            raise ValueError(f"svd_num_heads {self.svd_num_heads} must divide 2 x noise_resolution "
                             f"({2 * self.noise_resolution})")
        grid = self.swin_img_size // self.swin_patch_size
        if self.swin_img_size % self.swin_patch_size or grid % 2 ** (len(self.swin_depths) - 1):
            raise ValueError(f"swin_img_size {self.swin_img_size} / swin_patch_size {self.swin_patch_size} must be "
                             f"a whole number divisible by {2 ** (len(self.swin_depths) - 1)} (one halving per stage)")
        if not 0.0 <= self.swin_drop_path_rate < 1.0:
            raise ValueError(f"swin_drop_path_rate must be in [0, 1), got {self.swin_drop_path_rate}")

    @property
    def swin_feature_size(self) -> int:
        """h = w of the Swin's last feature map: the channels NPNet's up-convolution reads."""
        return self.swin_img_size // self.swin_patch_size // 2 ** (len(self.swin_depths) - 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "NPNetConfig":
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}")
        return cls(**d)


def tile_channels(x: torch.Tensor) -> torch.Tensor:
    """(B, 4, H, W) -> (B, 2H, 2W): channel 2a + c becomes block (a, c) of one matrix."""
    b, _, h, w = x.shape
    return x.reshape(b, 2, 2, h, w).permute(0, 1, 3, 2, 4).reshape(b, 2 * h, 2 * w)


def untile_channels(m: torch.Tensor) -> torch.Tensor:
    """(B, 2H, 2W) -> (B, 4, H, W), the inverse of `tile_channels`."""
    b, h2, w2 = m.shape
    return m.reshape(b, 2, h2 // 2, 2, w2 // 2).permute(0, 1, 3, 2, 4).reshape(b, 4, h2 // 2, w2 // 2)


class RowAttention(nn.Module):
    """Multi-head self-attention over the rows of a (B, N, D) input (qkv without bias, as NPNet's)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, D / heads)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, d_out))


class SVDBranch(nn.Module):
    """NPNet's SVD branch: new singular values for the tiled noise matrix, its singular vectors kept."""

    def __init__(self, cfg: NPNetConfig):
        super().__init__()
        d = 2 * cfg.noise_resolution  # the tiled matrix is (2H, 2W)
        self.mlp1 = _mlp(d, cfg.svd_hidden_dim, d)  # reads U^T
        self.mlp2 = _mlp(d, cfg.svd_hidden_dim, d)  # reads V (torch's Vh)
        self.mlp3 = nn.Sequential(nn.Linear(d, d))  # reads s
        self.attention = RowAttention(d, cfg.svd_num_heads)
        self.bn = nn.BatchNorm2d(d)  # in NPNet's checkpoint, unused by its forward
        self.mlp4 = _mlp(d, cfg.svd_mlp_dim, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 4, H, W) -> (B, 4, H, W)."""
        u, s, v = torch.linalg.svd(tile_channels(x))  # (B, D, D), (B, D), (B, D, D)
        h = self.mlp1(u.transpose(1, 2)) + self.mlp2(v) + self.mlp3(s)[:, None, :]  # (B, D, D)
        s_new = self.mlp4(self.attention(h).mean(dim=1)) + s  # (B, D)
        return untile_channels(u @ torch.diag_embed(s_new) @ v)


class SwinBranch(nn.Module):
    """NPNet's Swin branch (`NoiseTransformer`): resize, 4 -> 3 channels, Swin features, resize back, -> 4 channels."""

    def __init__(self, cfg: NPNetConfig):
        super().__init__()
        from timm.models.swin_transformer import SwinTransformer

        self.img_size, self.resolution = cfg.swin_img_size, cfg.noise_resolution
        self.upconv = nn.Conv2d(cfg.swin_feature_size, cfg.latent_channels, 1)
        self.downconv = nn.Conv2d(cfg.latent_channels, 3, 1)
        self.swin = SwinTransformer(img_size=cfg.swin_img_size, patch_size=cfg.swin_patch_size, in_chans=3,
                                    num_classes=cfg.swin_num_classes, embed_dim=cfg.swin_embed_dim,
                                    depths=tuple(cfg.swin_depths), num_heads=tuple(cfg.swin_num_heads),
                                    window_size=cfg.swin_window_size, drop_path_rate=cfg.swin_drop_path_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 4, H, W) -> (B, 4, H, W)."""
        img = self.downconv(F.interpolate(x, size=[self.img_size, self.img_size]))  # (B, 3, S, S)
        feats = self.swin.forward_features(img)  # (B, h, w, C): timm's channels-last features
        return self.upconv(F.interpolate(feats, size=[self.resolution, self.resolution]))  # h read as channels


class AdaGroupNorm(nn.Module):
    """GroupNorm of x without affine parameters, scaled and shifted by a linear map of a conditioning vector
    (diffusers' AdaGroupNorm without activation: the layout of NPNet's `embeeding`)."""

    def __init__(self, embedding_dim: int, out_dim: int, num_groups: int = 1, eps: float = 1e-6):
        super().__init__()
        self.num_groups, self.eps = num_groups, eps
        self.linear = nn.Linear(embedding_dim, 2 * out_dim)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(emb)[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
        return F.group_norm(x, self.num_groups, eps=self.eps) * (1 + scale) + shift


class NPNet(ExportableModel, nn.Module):
    """NPNet: x_T (B, 4, H, W) and a text embedding (B, P) -> golden noise (B, 4, H, W) in one forward; exported as
    every noise model is (golden_noise.export), or loaded from NPNet's released checkpoint (`load_released`)."""

    model_type = MODEL_TYPE
    config_class = NPNetConfig
    one_step = True

    def __init__(self, config: NPNetConfig):
        super().__init__()
        self.config = config
        self.unet_svd = SVDBranch(config)
        self.unet_embedding = SwinBranch(config)
        self.text_embedding = AdaGroupNorm(config.text_embed_dim, config.latent_channels, 1, eps=1e-6)
        self.alpha = nn.Parameter(torch.zeros(1))
        self.beta = nn.Parameter(torch.zeros(1))

    def forward(self, x_T: torch.Tensor, text: torch.Tensor):
        """x_T (B, C, H, W), text (B, P) (or (B, L, D), flattened) -> (golden (B, C, H, W), None: no variance)."""
        x = x_T.float()
        text_emb = self.text_embedding(x, text.float().reshape(text.shape[0], -1))  # (B, C, H, W)
        golden = (self.unet_svd(x) + (2 * torch.sigmoid(self.alpha) - 1) * text_emb
                  + self.beta * self.unet_embedding(x + text_emb))
        return golden, None

    @torch.no_grad()
    def generate_sequence(self, x_T: torch.Tensor, text: torch.Tensor, n: int | None = None, sample: bool = False,
                          generator: torch.Generator | None = None) -> torch.Tensor:
        """x_T (B, C, H, W), text (B, P) -> (B, 1, C, H, W): the golden noise (NPNet is deterministic: `sample`,
        `generator` and `n` are accepted for the rollout interface)."""
        was_training = self.training
        self.eval()
        try:
            return self(x_T, text)[0][:, None]
        finally:
            self.train(was_training)

    # ---- NPNet's released checkpoint --------------------------------------------------------------------
    def load_released_state(self, checkpoint: dict) -> None:
        """Load NPNet's released checkpoint dict ({"unet_svd", "unet_embedding", "embeeding": state dicts, "alpha",
        "beta": tensors}) strictly."""
        self.load_state_dict(released_to_state_dict(checkpoint), strict=True)


def released_to_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """NPNet's checkpoint dict -> this module's state dict (its keys prefixed by our submodule names)."""
    state = {}
    for part, prefix in CHECKPOINT_PARTS.items():
        for key, value in checkpoint[part].items():
            state[f"{prefix}.{key}"] = value
    for key, name in CHECKPOINT_SCALARS.items():
        value = checkpoint[key]
        state[name] = (value if isinstance(value, torch.Tensor) else torch.tensor(value)).detach().float().reshape(1)
    return state


def config_from_released(checkpoint: dict) -> NPNetConfig:
    """The NPNetConfig whose shapes match a released-format checkpoint (sizes read from its tensors; the SVD
    branch's attention heads, which no shape shows, are NPNet's 8, and the Swin's drop-path rate timm's 0.1)."""
    svd, swin, emb = checkpoint["unet_svd"], checkpoint["unet_embedding"], checkpoint["embeeding"]
    d = int(svd["mlp1.0.weight"].shape[1])
    depths, heads, stage = [], [], 0
    while any(k.startswith(f"swin.layers.{stage}.") for k in swin):
        blocks = {int(k.split(".")[4]) for k in swin if k.startswith(f"swin.layers.{stage}.blocks.")}
        depths.append(len(blocks))
        heads.append(int(swin[f"swin.layers.{stage}.blocks.0.attn.relative_position_bias_table"].shape[1]))
        stage += 1
    window = int(round(math.sqrt(int(swin["swin.layers.0.blocks.0.attn.relative_position_bias_table"].shape[0]))))
    patch = int(swin["swin.patch_embed.proj.weight"].shape[-1])
    feature = int(swin["upconv.weight"].shape[1])
    return NPNetConfig(latent_channels=int(swin["upconv.weight"].shape[0]), noise_resolution=d // 2,
                       text_embed_dim=int(emb["linear.weight"].shape[1]), svd_hidden_dim=int(svd["mlp1.0.weight"].shape[0]),
                       svd_mlp_dim=int(svd["mlp4.0.weight"].shape[0]), swin_img_size=feature * patch * 2 ** (stage - 1),
                       swin_patch_size=patch, swin_embed_dim=int(swin["swin.patch_embed.proj.weight"].shape[0]),
                       swin_depths=depths, swin_num_heads=heads, swin_window_size=(window + 1) // 2,
                       swin_num_classes=int(swin["swin.head.fc.weight"].shape[0]) if "swin.head.fc.weight" in swin else 0)


SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"


def load_released(path: str | os.PathLike, device=None, dtype=None):
    """NPNet's released checkpoint (`sdxl.pth`: a torch.save of {"unet_svd", "unet_embedding", "embeeding": state
    dicts, "alpha", "beta": tensors}), read with weights_only=True (no code is unpickled), as a golden_noise.export
    Export (its identity: the file's sha256 and the config document's). Its sizes come from its tensors; the config
    document says what it was trained for: SDXL base's latents at 8 px per latent pixel, SDXL's prompt_embeds
    flattened as the text input, one golden step."""
    try:
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # missing, truncated, or a pickle that needs code
        raise UserError(f"--npnet_weights {path}: cannot read it as NPNet's checkpoint with weights_only=True "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    missing = [k for k in (*CHECKPOINT_PARTS, *CHECKPOINT_SCALARS)
               if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise UserError(f"--npnet_weights {path} is not NPNet's released checkpoint: it lacks {', '.join(missing)} "
                        "(expected the keys unet_svd, unet_embedding, embeeding, alpha, beta)")
    try:
        config = config_from_released(checkpoint)
        model = NPNet(config)
        model.load_released_state(checkpoint)
    except Exception as e:  # shapes of another architecture
        raise UserError(f"--npnet_weights {path}: cannot load it into NPNet ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:300]})") from None
    res = config.noise_resolution
    meta = {"model_type": MODEL_TYPE, "model_config": config.to_dict(),
            "run_config": {"base_model_id": SDXL_BASE, "num_steps": 1, "latent_shape": [config.latent_channels, res, res],
                           "height": 8 * res, "width": 8 * res,
                           "text_embedding": {"kind": "prompt_embeds", "dim": config.text_embed_dim}}}
    model.to(device=device, dtype=dtype)
    path = Path(path).resolve()
    return Export(model.eval(), meta, ExportFiles(path, path))
