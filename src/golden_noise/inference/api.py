"""Golden noise from a trained RNN export (the `GoldenNoise` API) and from the real golden step (the oracle)."""
from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path
from typing import Sequence

import torch

from ..diffusion import encode_prompts, family_of, latent_shape, resolve_text_embedding, seeded_noise, text_embedding
from ..errors import UserError
from ..golden import GoldenConfig, golden_step
from ..runtime import get_logger
from ..export import load_export, push_export
from ..model import model_type_of
from ..model.npnet import load_released

logger = get_logger(__name__)

DEFAULT_NUM_GEN_STEPS = 10  # used only when no RNN export says how many steps its data had


def load_rnn_export(path: str | os.PathLike, device=None, dtype=None, predict_variance: bool = False,
                    revision: str | None = None, token: str | bool | None = None, model_type: str | None = None,
                    flag: str = "--rnn_weights_path"):
    """Load a trained noise-model export (any spelling golden_noise.export.resolve_export takes: a local export, a
    run directory, the seed's `.pth` name, a hub repo id) -> golden_noise.export.Export (model in eval mode);
    UserError when missing, invalid or edited. `model_type`: the type the export must be (golden_noise.model's
    registry; None: any), else a UserError naming `flag`; for NPNet, a `.pth` without a safetensors export beside it
    is NPNet's released checkpoint (read with weights_only=True). `predict_variance=True` (the seed's flag) requires
    an export trained with the variance head."""
    released = (model_type == "NPNet" and Path(path).suffix == ".pth"
                and not Path(path).with_suffix(".safetensors").is_file())
    if released:
        export = load_released(path, device=device, dtype=dtype)
    else:
        if Path(path).suffix == ".pth":
            logger.info("%s %s: .pth means the safetensors export beside it (+ .json); a pickled .pth is never "
                        "loaded", flag, path)
        export = load_export(path, device=device, dtype=dtype, revision=revision, token=token)
    if model_type is not None and model_type_of(export.meta) != model_type:
        raise UserError(f"{flag} {path} is a {model_type_of(export.meta)} export, not {model_type}: pass a "
                        f"{model_type} export (train_rnn_model_v3.py --model_type {model_type})")
    if predict_variance and not (export.meta.get("model_config") or {}).get("predict_variance", False):
        raise UserError(f"--predict_variance was given, but the RNN export {export.files.config} was trained without "
                        "it (model_config.predict_variance is false): drop --predict_variance or pass an export "
                        "trained with it")
    return export


def export_latent_shape(meta: dict) -> tuple[int, int, int]:
    """(C, H, W) of the noise an export was trained on."""
    rc = meta.get("run_config") or {}
    if rc.get("latent_shape"):
        return tuple(int(v) for v in rc["latent_shape"])
    mc = meta["model_config"]
    res = mc["noise_resolution"]
    h, w = (res, res) if isinstance(res, int) else tuple(res)
    return (int(mc["latent_channels"]), int(h), int(w))


def golden_config_from(run_config: dict | None, **overrides) -> GoldenConfig:
    """The golden-step parameters of a training run's data, with explicit (non-None) overrides on top."""
    names = {f.name for f in fields(GoldenConfig)}
    values = {k: v for k, v in ((run_config or {}).get("golden") or {}).items() if k in names}
    for key, value in overrides.items():
        if value is None:
            continue
        if key in values and values[key] != value:
            logger.warning("oracle: %s=%s differs from the %s the RNN's training data used; the oracle uses %s",
                           key, value, values[key], value)
        values[key] = value
    return GoldenConfig(**values).check()  # refuses a value out of range, naming the flag


def describe_latent_space(space: dict) -> str:
    """One line naming a latent space: family, channels, VAE scale, scaling/shift factors and fingerprint."""
    parts = [f"{space.get('family')}", f"{space.get('latent_channels')} channels", f"VAE /{space.get('vae_scale_factor')}",
             f"scaling_factor {space.get('scaling_factor')}"]
    if space.get("shift_factor") is not None:
        parts.append(f"shift_factor {space['shift_factor']}")
    if space.get("latents_mean") is not None:
        parts.append("latents_mean/std")
    return f"[{', '.join(parts)}; {space.get('fingerprint')}]"


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def oracle_noise(pipe, prompts: Sequence[str], x_T: torch.Tensor, num_steps: int, config: GoldenConfig,
                 height: int | None = None, width: int | None = None) -> torch.Tensor:
    """The real golden step applied `num_steps` times to x_T: (B, C, H, W) -> x'_n (B, C, H, W) float32.

    Uses the pipeline's own (default) scheduler config and its family's golden step, like the data generation stage."""
    config.check()
    step = golden_step(pipe, config, height, width)
    cond = encode_prompts(pipe, list(prompts), height=height, width=width)
    return step.sequence(x_T.to(family_of(pipe).device, torch.float32), cond, num_steps)[:, -1]


class GoldenNoise:
    """Turn a prompt and a seed into golden initial latents for your own diffusers pipeline (the family the RNN was
    trained for: SDXL, SD 1.5/2.1, SD3, FLUX), or for a separate sampler of the same latent space.

        gn = GoldenNoise.from_pretrained("output/run/rnn_v3_model_final", pipe=pipe)  # or a hub id "owner/name"
        image = pipe(prompt, latents=gn(prompt, seed=0)).images[0]
        image = turbo(prompt, latents=gn(prompt, seed=0, sampler=turbo), num_inference_steps=1).images[0]
    """

    def __init__(self, model, meta: dict, pipe=None, device=None, export=None):
        self.model = model
        self.meta = meta
        self.pipe = pipe
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.export = export  # the golden_noise.export.Export it was loaded from (files, identity), if any

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, pipe=None, device=None, dtype=None,
                        predict_variance: bool = False, revision: str | None = None,
                        token: str | bool | None = None, model_type: str | None = None,
                        flag: str = "--rnn_weights_path") -> "GoldenNoise":
        """Load an export: a hub repo id ("owner/name", at `revision`; from the cache when offline), a folder holding
        model.safetensors + config.json, or a training export (the .safetensors, the .json, their stem, the run
        directory or the seed's `.pth` name). The RNN runs on `device` (default: the pipeline's device, else CPU)
        in `dtype` (default float32). `predict_variance=True` refuses an export trained without the variance head;
        an edited, foreign or incomplete export is a one-line UserError. Any noise model loads (`model_type`: require
        one of golden_noise.model's registry, naming `flag` otherwise); NPNet also from its released `.pth`."""
        if device is None:
            device = family_of(pipe).device if pipe is not None else torch.device("cpu")
        export = load_rnn_export(path, device=device, dtype=dtype or torch.float32,
                                 predict_variance=predict_variance, revision=revision, token=token,
                                 model_type=model_type, flag=flag)
        gn = cls(export.model, export.meta, pipe=pipe, device=device, export=export)
        if pipe is not None:
            gn.check_pipeline(pipe)
            if gn.height and tuple(latent_shape(pipe)) != gn.latent_shape:
                logger.warning("the RNN was trained at %sx%s px, not the pipeline's default size: call "
                               "pipe(..., height=gn.height, width=gn.width)", gn.height, gn.width)
        return gn

    def push_to_hub(self, repo_id: str, token: str | None = None, private: bool | None = None,
                    evaluation: str | os.PathLike | None = None, commit_message: str | None = None,
                    revision: str | None = None) -> str:
        """Upload this export to the hub repo `repo_id` ("owner/name"; created, `private` if asked, when new):
        model.safetensors, config.json and a generated model card README.md. `evaluation`: a stage-6 results folder
        (or its summary.json) or a sweep folder (or its sweep.csv) to summarise in the card. Returns the commit URL."""
        if self.export is None:
            raise UserError("push_to_hub needs a GoldenNoise loaded with from_pretrained (it pushes that export)")
        return push_export(self.export, repo_id, token=token, private=private, evaluation=evaluation,
                           commit_message=commit_message, revision=revision, what="push_to_hub")

    @property
    def identity(self) -> dict | None:
        """The export's weights sha256 and config sha256 (what every run's settings record); None if not loaded
        from an export."""
        return self.export.identity if self.export is not None else None

    @property
    def run_config(self) -> dict:
        """The training dataset's run_config.json, as stored in the export."""
        return self.meta.get("run_config") or {}

    @property
    def model_config(self) -> dict:
        return self.meta.get("model_config") or {}

    @property
    def model_type(self) -> str:
        """NoiseSequenceRNN_v3 (rolled out n steps), DirectNoiseModel or NPNet (x'_n in one forward)."""
        return model_type_of(self.meta)

    @property
    def predicts_step(self) -> int | None:
        """The golden step k of x'_k that a one-step model (DirectNoiseModel, NPNet) predicts in one forward: its
        training sequences' length (run_config num_steps, or the training's --max_seq_len); None for the RNN."""
        if not getattr(self.model, "one_step", False):
            return None
        n = self.run_config.get("num_steps")
        cut = (((self.meta.get("training") or {}).get("args")) or {}).get("max_seq_len")
        return int(min(n, cut) if n is not None and cut else n) if n is not None else None

    @property
    def num_steps(self) -> int | None:
        """How many golden steps the training sequences held (the default rollout length; a one-step model's: the
        step it predicts)."""
        if self.predicts_step is not None:
            return self.predicts_step
        n = self.run_config.get("num_steps")
        return int(n) if n is not None else None

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the noise the RNN was trained on."""
        return export_latent_shape(self.meta)

    @property
    def height(self) -> int | None:
        """Image height the training data used (pass it to `pipe(..., height=gn.height)` if not the default)."""
        return self.run_config.get("height")

    @property
    def width(self) -> int | None:
        return self.run_config.get("width")

    def _pipe(self, pipe):
        pipe = pipe if pipe is not None else self.pipe
        if pipe is None:
            raise UserError("GoldenNoise needs a pipeline for the text embedding: pass pipe= to from_pretrained "
                            "or to the call")
        return pipe

    def check_pipeline(self, pipe, height: int | None = None, width: int | None = None) -> None:
        """Raise UserError unless `pipe` at `height` x `width` uses the latent shape the RNN was trained on."""
        height, width = height or self.height, width or self.width
        have = tuple(latent_shape(pipe, height, width))
        want = self.latent_shape
        if have != want:
            size = f"{height or 'default'}x{width or 'default'}"
            raise UserError(f"the RNN export was trained on latents {list(want)}, but the pipeline at {size} px "
                            f"makes latents {list(have)}: pass --height/--width matching the training data "
                            f"({self.run_config.get('height')}x{self.run_config.get('width')}) or use an export "
                            "trained at this resolution")
        self.check_sampler(pipe, "the pipeline")
        dim = self.model_config.get("text_embed_dim")
        have = resolve_text_embedding(pipe, self.text_embedding_kind)["dim"]
        if dim is not None and int(dim) != have:
            raise UserError(f"the RNN export expects {self.text_embedding_kind} text embeddings of size {dim}, but "
                            f"this pipeline's are of size {have}: use the base model the RNN was trained with "
                            f"({self.run_config.get('base_model_id', 'see its run_config')})")

    @property
    def latent_space(self) -> dict | None:
        """The latent space the RNN was trained for (family, channels, VAE scale and normalisation, fingerprint);
        None for exports made before it was recorded."""
        return self.run_config.get("latent_space")

    def check_sampler(self, sampler, what: str = "--sampling_model_id") -> None:
        """Raise UserError unless `sampler` (a pipeline) has the latent space the RNN was trained for."""
        want = self.latent_space
        if want is None:
            return
        have = family_of(sampler).latent_space()
        if have["fingerprint"] != want.get("fingerprint"):
            raise UserError(f"{what} ({type(sampler).__name__}) works in another latent space than the RNN was "
                            f"trained for: {describe_latent_space(have)} vs the RNN's {describe_latent_space(want)} "
                            f"(base model {self.run_config.get('base_model_id')}); sample with a pipeline of the "
                            "RNN's latent space")

    @property
    def text_embedding_kind(self) -> str:
        """What the RNN reads as text (diffusion.TEXT_EMBEDDINGS), as its training data stored it."""
        return (self.run_config.get("text_embedding") or {}).get("kind", "pooled")

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str], pipe=None) -> torch.Tensor:
        """The prompt embedding the RNN is conditioned on, computed as its training data did: (B, P) float32."""
        pipe = self._pipe(pipe)
        prompts = list(prompts)
        cond = encode_prompts(pipe, prompts, with_uncond=False)
        return text_embedding(pipe, prompts, cond, self.text_embedding_kind).to(self.device, torch.float32)

    def initial_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """x_T for each seed (B, C, H, W) float32 on CPU, unpacked: what `pipe(generator=Generator().manual_seed(s))`
        draws (every family draws it so; FLUX packs it afterwards)."""
        return seeded_noise(list(seeds), self.latent_shape)

    @torch.no_grad()
    def rollout(self, x_T: torch.Tensor, text: torch.Tensor, num_steps: int | None = None, sample: bool = False,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Roll the RNN out from x_T (B, C, H, W) with text embeddings (B, P): -> (B, n, C, H, W) float32; a one-step
        model (DirectNoiseModel, NPNet) returns (B, 1, C, H, W), its x-hat'_n, and only for its own n."""
        n = int(num_steps or self.num_steps or DEFAULT_NUM_GEN_STEPS)
        if n < 1:
            raise UserError(f"--num_gen_steps must be at least 1, got {n}")
        if self.predicts_step is not None and n != self.predicts_step:
            raise UserError(f"the {self.model_type} model predicts x'_{self.predicts_step} in one forward (it was "
                            f"trained on {self.predicts_step}-step sequences): it has no rollout of {n} steps; pass "
                            f"--num_gen_steps {self.predicts_step} or train it on {n}-step sequences")
        x = x_T.to(self.device, torch.float32)
        seq = self.model.generate_sequence(x, text.to(self.device, torch.float32), n, sample=sample,
                                           generator=generator)
        return seq.float()  # (B, n, C, H, W)

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str], seed: int | Sequence[int] | None = None, pipe=None,
                 latents: torch.Tensor | None = None, num_steps: int | None = None, sample: bool = False,
                 generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
                 sampler=None) -> torch.Tensor:
        """Golden latents for `pipe(prompt, latents=...)` (B, C, H, W; FLUX: packed), on the pipeline's device in its
        dtype. `sampler`: another pipeline of the same latent space that will sample them (checked; e.g. SDXL-Turbo
        for an SDXL-trained RNN); the text embedding always comes from `pipe`, the RNN's base model.

        The start noise is `latents` (B, C, H, W) if given, else drawn per prompt: an int seed s gives prompt i
        the seed s + i, a list one seed each, exactly as `pipe(prompts, generator=[torch.Generator()
        .manual_seed(s_i) ...])` draws it in float32. `sample=True` draws each step from the predicted Gaussian
        (exports trained with predict_variance) using `generator` (on the RNN's device)."""
        pipe = self._pipe(pipe)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if latents is None:
            if seed is None:
                raise UserError("pass seed= (an int, or one per prompt) or latents=")
            seeds = [seed + i for i in range(len(prompts))] if isinstance(seed, int) else list(seed)
            if len(seeds) != len(prompts):
                raise UserError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
            latents = self.initial_noise(seeds)
        target = pipe
        if sampler is not None:
            self.check_sampler(sampler, "sampler")
            target = sampler
        golden = self.rollout(latents, self.text_embeddings(prompts, pipe), num_steps, sample, generator)[:, -1]
        family = family_of(target)
        golden = family.pipeline_latents(golden, self.height or family.default_size()[0],
                                         self.width or family.default_size()[1])
        return golden.to(family.device, dtype or family.denoiser.dtype)
