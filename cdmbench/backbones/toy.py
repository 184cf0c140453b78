"""The embedded toy backbone: a micro SD3-family MMDiT over the 8×8×4 latents of a tiny VAE (diffusers
``AutoencoderKL``, 32×32 RGB) with a tiny CLIP text encoder, all trained by the project on procedural
shapes and shipped as package data (one file).

Same conventions as the SD3 adapter: ``timestep = 1000·σ``, per-token + pooled text conditioning,
uncond = encoding of "", static scheduler shift 3.0 (like SD3-Medium), and latents decoded as
``vae.decode(latents / scaling_factor + shift_factor)`` (cdm.md §1). A teacher file without a VAE
(the pixel-space teachers before v3) runs in pixel space, pixels in [−1, 1].
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from cdmbench.backbones import BACKBONES
from cdmbench.backbones.base import Backbone, BackboneOptions, Cond
from cdmbench.errors import CdmbenchError, MissingWeightsError
from cdmbench.types import ATTRS, Evaluators, Prompt

TEACHER_ASSET = "toy_teacher.safetensors"


def default_teacher_path() -> Path:
    return Path(str(resources.files("cdmbench") / "assets" / TEACHER_ASSET))


class ToyWeights(NamedTuple):
    tokenizer: Any
    text_encoder: nn.Module
    transformer: nn.Module
    vae: nn.Module | None  # None: a pixel-space teacher (before v3)
    record: dict


def load_toy_weights(path: Path) -> ToyWeights:
    """Tokenizer, text encoder, transformer, VAE and training record from a toy teacher file."""
    from safetensors import safe_open

    from cdmbench.toy.models import arch_from_record, build_text_encoder, build_tokenizer, build_transformer

    if not path.is_file():
        raise MissingWeightsError(
            f"toy teacher weights not found at {path}; reinstall cdmbench or rebuild them with "
            f"`cdmbench toy train-teacher --out {path}`"
        )
    with safe_open(str(path), "pt") as f:
        record = json.loads((f.metadata() or {}).get("cdmbench", "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    arch = arch_from_record(record)
    text, net = build_text_encoder(arch), build_transformer(arch)
    for prefix, module in (("text_encoder.", text), ("transformer.", net)):
        sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        module.load_state_dict(sd, strict=True)
    vae = None
    if "vae" in record:
        from cdmbench.toy.vae import vae_from_tensors

        vae = vae_from_tensors(tensors, record["vae"], prefix="vae.")
    return ToyWeights(build_tokenizer(), text, net, vae, record)


@BACKBONES.register("toy")
class ToyBackbone(Backbone):
    """Micro SD3 (MMDiT) teacher on toy-VAE latents of 32×32 RGB shapes; runs everything on a CPU."""

    shift = 3.0
    default_guidance = 4.0
    default_teacher_steps = 28
    fsdp_block_classes = ("JointTransformerBlock",)
    lora_target_modules = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                           "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")

    def __init__(self, options: BackboneOptions = BackboneOptions()):
        super().__init__(options)
        if options.allow_remote_code:
            raise CdmbenchError("the toy backbone has no remote code; drop allow_remote_code")
        self.weights_path = Path(options.model) if options.model else default_teacher_path()
        self.tokenizer, text, net, vae, self.record = load_toy_weights(self.weights_path)
        if options.dtype != "float32":
            text, net = text.to(options.torch_dtype), net.to(options.torch_dtype)
        self.text_encoder = text.to(self.device).eval().requires_grad_(False)
        self._teacher = net.to(self.device).eval().requires_grad_(False)
        self.vae = None if vae is None else vae.to(self.device).eval().requires_grad_(False)  # float32

    @property
    def teacher(self) -> nn.Module:
        return self._teacher

    @property
    def latent_shape(self) -> tuple[int, ...]:
        cfg = self._teacher.config
        return (cfg.in_channels, cfg.sample_size, cfg.sample_size)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        from cdmbench.toy.models import encode_text

        embeds, pooled = encode_text(self.tokenizer, self.text_encoder, list(prompts))
        return Cond({"embeds": embeds, "pooled": pooled})

    def velocity(self, net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        dtype = next(net.parameters()).dtype
        return net(
            hidden_states=x.to(dtype), timestep=1000 * sigma.float(),  # fp32 whatever the network dtype (as SD3)
            encoder_hidden_states=cond.batched["embeds"].to(dtype),
            pooled_projections=cond.batched["pooled"].to(dtype), return_dict=False,
        )[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``vae.decode(latents / scaling_factor + shift_factor)`` as the SD3 adapter; differentiable in the
        latents (DMD's regression distance backpropagates through it)."""
        if self.vae is None:
            return ((latents.float() + 1) / 2).clamp(0, 1)
        from cdmbench.toy.vae import decode_latents

        return decode_latents(self.vae, latents.float())

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] → latents (z − shift_factor) · scaling_factor with z the posterior mean, as the SD3
        adapter's ``_vae_encode`` (the inverse convention of ``decode``)."""
        if self.vae is None:
            return images.float() * 2 - 1  # pixel space: latents are the images in [−1, 1]
        from cdmbench.toy.vae import encode_latents

        return encode_latents(self.vae, images.float().to(self.device))

    has_train_prompts = True

    def train_prompts(self, n: int, generator: torch.Generator) -> list[str]:
        from cdmbench.toy.shapes import random_captions

        return random_captions(n, generator)

    def real_batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        """``n`` procedurally drawn shapes images (as latents) with their captions."""
        from cdmbench.toy.shapes import random_attrs, render, caption

        attrs = random_attrs(n, generator)
        images = render(attrs, generator).to(self.device)
        return self.encode_images(images), [caption(a) for a in attrs]

    @property
    def image_resolution(self) -> int:
        from cdmbench.toy.shapes import RESOLUTION

        return RESOLUTION

    def data_source(self, *, seed: int, process_index: int = 0):
        from cdmbench.data import ProceduralSource

        return ProceduralSource(self.real_batch, "toy shapes (cdmbench.toy.shapes)", seed=seed,
                                process_index=process_index)

    @classmethod
    def tiny(cls, workdir: Path) -> "ToyBackbone":
        """The shipped toy is small already."""
        return cls()

    # -- how its images are scored: the toy evaluators (cdmbench.toy.evaluators) -------------------
    @classmethod
    def evaluators(cls) -> Evaluators:
        """Toy-classifier FID features with shipped reference stats, the toy CLIP, the toy attribute classifier,
        real renders per caption and the free-factor regressor; the scorers of natural images do not apply."""
        from cdmbench.toy import evaluators as ev
        from cdmbench.toy import factors

        shapes = "rates natural images; the toy backbone draws 32x32 shapes"
        return Evaluators(
            fid=ev.fid_features, clip=ev.clip_model, attributes=ev.attribute_model, references=factors.reference_images,
            factors=factors.factor_model,
            not_applicable={
                "hps": f"HPS v2.1 {shapes}", "imagereward": f"ImageReward {shapes}", "pickscore": f"PickScore {shapes}",
                "aesthetic": "the aesthetic predictor rates natural images; the toy draws 32x32 shapes",
                "intra_lpips": "LPIPS's ImageNet trunk is not shipped and not meant for 32x32 shapes; "
                               "the toy's diversity is vendi and factor_w1",
            })

    @classmethod
    def prompt_set(cls) -> list[Prompt]:
        """The fixed, versioned toy prompt set (``cdmbench.toy.shapes.eval_prompts``) with attribute labels."""
        from cdmbench.toy.shapes import eval_prompts

        return eval_prompts()

    @classmethod
    def annotate_prompts(cls, prompts: list[Prompt]) -> list[Prompt]:
        """Attribute labels (``meta[ATTRS]``) when every caption is in the shapes grammar, else the prompts as read."""
        from cdmbench.toy.shapes import parse_caption

        try:
            attrs = [parse_caption(p.text) for p in prompts]
        except CdmbenchError:
            return prompts
        return [Prompt(p.id, p.text, {**p.meta, ATTRS: a}) for p, a in zip(prompts, attrs)]

    def describe(self) -> dict:
        vae = None if self.vae is None else {k: self.record["vae"][k] for k in ("scaling_factor", "shift_factor", "arch", "seed", "steps")}
        return {**super().describe(), "model": str(self.weights_path.name if not self.options.model else self.options.model),
                "teacher_version": self.record.get("version", "toy-teacher-v2"), "vae": vae}
