"""The embedded toy backbone: a micro SD3-family MMDiT in 32×32 pixel space with a tiny CLIP text
encoder, trained by the project on procedural shapes and shipped as package data.

Same conventions as the SD3 adapter: ``timestep = 1000·σ``, per-token + pooled text conditioning,
uncond = encoding of "", static scheduler shift 3.0 (like SD3-Medium). Pixels live in [−1, 1].
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from cdmbench.backbones import BACKBONES
from cdmbench.backbones.base import Backbone, BackboneOptions, Cond
from cdmbench.errors import CdmbenchError, MissingWeightsError
from cdmbench.types import ATTRS, Evaluators, Prompt

TEACHER_ASSET = "toy_teacher.safetensors"


def default_teacher_path() -> Path:
    return Path(str(resources.files("cdmbench") / "assets" / TEACHER_ASSET))


def load_toy_weights(path: Path):
    """(tokenizer, text encoder, transformer, training record) from a toy teacher file."""
    from safetensors import safe_open

    from cdmbench.toy.models import ToyArch, build_text_encoder, build_tokenizer, build_transformer

    if not path.is_file():
        raise MissingWeightsError(
            f"toy teacher weights not found at {path}; reinstall cdmbench or rebuild them with "
            f"`cdmbench toy train-teacher --out {path}`"
        )
    with safe_open(str(path), "pt") as f:
        record = json.loads((f.metadata() or {}).get("cdmbench", "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    arch = ToyArch(**record.get("arch", {}))
    text, net = build_text_encoder(arch), build_transformer(arch)
    for prefix, module in (("text_encoder.", text), ("transformer.", net)):
        sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        module.load_state_dict(sd, strict=True)
    return build_tokenizer(), text, net, record


@BACKBONES.register("toy")
class ToyBackbone(Backbone):
    """Micro SD3 (MMDiT) teacher on 32×32 RGB shapes; runs everything on a CPU."""

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
        self.tokenizer, text, net, self.record = load_toy_weights(self.weights_path)
        if options.dtype != "float32":
            text, net = text.to(options.torch_dtype), net.to(options.torch_dtype)
        self.text_encoder = text.to(self.device).eval().requires_grad_(False)
        self._teacher = net.to(self.device).eval().requires_grad_(False)

    @property
    def teacher(self) -> nn.Module:
        return self._teacher

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (3, 32, 32)

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
        return ((latents.float() + 1) / 2).clamp(0, 1)

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
        return self.latent_shape[-1]

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return images.float() * 2 - 1  # pixel space: latents are the images in [−1, 1]

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
        return {**super().describe(), "model": str(self.weights_path.name if not self.options.model else self.options.model)}
