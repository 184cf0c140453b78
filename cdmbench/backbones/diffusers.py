"""What every diffusers pipeline backbone shares (``sd3.py``, ``longcat.py``; ``export.py`` checks for it).

``load_pipeline`` loads a pipeline from a hub id or a local folder with one clear ``MissingWeightsError``;
``flow_match_shift`` writes out the FlowMatchEuler scheduler's σ warp (cdm.md §1.1); ``DiffusersBackbone``
holds frozen encoders/VAE, a small prompt-embedding cache, the σ shift, and full or LoRA (peft) trainable
copies. diffusers, transformers and peft are imported inside functions, so listing backbones stays cheap.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from abc import abstractmethod
from collections import OrderedDict
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from cdmbench.backbones.base import Backbone, BackboneOptions, Cond
from cdmbench.errors import CdmbenchError, MissingWeightsError
from cdmbench.sampling import static_shift

logger = logging.getLogger(__name__)

# Attention projections of the joint (image + text) blocks, as in diffusers' SD3 DreamBooth-LoRA script.
ATTN_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                     "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")

# FlowMatchEulerDiscreteScheduler options that change the σ list in ways ``flow_match_shift`` does not model.
_UNMODELLED_SCHEDULER_OPTIONS = ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                                 "use_beta_sigmas", "invert_sigmas", "stochastic_sampling")


# ------------------------------------------------------------------------------------------------
# Loading: hub id or local folder, one clear error when the weights are not there.

def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _looks_like_path(model: str) -> bool:
    """A hub id is 'name' or 'owner/name'; anything else (absolute, ./, ~, deeper) is meant as a folder."""
    return os.path.isabs(model) or model.startswith((".", "~")) or model.count("/") > 1 or "\\" in model


def load_pipeline(pipeline_cls, arch: str, model: str, options: BackboneOptions, **kwargs):
    """``pipeline_cls.from_pretrained(model)`` (safetensors only), or ``MissingWeightsError`` in one line.

    Honours ``HF_HUB_OFFLINE`` and the Hugging Face cache; never runs repository code unless
    ``options.allow_remote_code``.
    """
    how = (f"on a connected machine run `hf download {model}` (or `huggingface-cli download {model}`) and "
           f"copy the Hugging Face cache (~/.cache/huggingface/hub, or $HF_HOME/hub) to this machine, "
           f"or pass --model /path/to/a/local/diffusers/folder")
    local = Path(model).expanduser()
    is_local = local.exists()
    if is_local:
        if not (local / "model_index.json").is_file():
            raise MissingWeightsError(f"{arch}: {local} is not a diffusers pipeline folder (no model_index.json); "
                                      f"pass --model with a folder written by save_pretrained, or a hub id")
        held = json.loads((local / "model_index.json").read_text()).get("_class_name")
        if held != pipeline_cls.__name__:
            raise MissingWeightsError(f"{arch}: {local} holds a {held}, not a {pipeline_cls.__name__}; "
                                      f"pick the backbone that matches the folder")
        source = str(local)
    elif _looks_like_path(model):
        raise MissingWeightsError(f"{arch}: model folder {model} does not exist; pass --model with a local "
                                  f"diffusers pipeline folder (save_pretrained layout) or a hub id (owner/name)")
    else:
        source = model
        if _hub_offline():
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(model, "model_index.json"), str):
                raise MissingWeightsError(f"{arch} weights {model!r} are not in the Hugging Face cache and "
                                          f"HF_HUB_OFFLINE=1: {how}")
    try:
        return pipeline_cls.from_pretrained(source, dtype=options.torch_dtype, use_safetensors=True,
                                            trust_remote_code=options.allow_remote_code, **kwargs)
    except (OSError, ValueError) as e:  # not (fully) cached, gated, no safetensors files, not this pipeline
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        reason = reason if len(reason) <= 300 else reason[:300] + "…"
        if is_local:  # downloading is not the fix
            raise MissingWeightsError(f"{arch}: could not load {source} as a {pipeline_cls.__name__} "
                                      f"with safetensors weights ({reason})") from e
        raise MissingWeightsError(f"{arch} weights {model!r} could not be loaded ({reason}); {how}") from e


# ------------------------------------------------------------------------------------------------
# The scheduler's σ warp (cdm.md §1.1), written out so tests can check it against diffusers.

def calculate_mu(image_seq_len: int, config, default_max_shift: float) -> float:
    """Resolution-dependent shift μ: linear in the image token count (Flux/SD3/LongCat pipelines)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", default_max_shift)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + base_shift - m * base_len


def check_scheduler_config(config) -> None:
    used = [k for k in _UNMODELLED_SCHEDULER_OPTIONS if config.get(k)]
    if used:
        raise CdmbenchError(f"scheduler options {used} are not supported (they change the σ list or the "
                            f"Euler step beyond the static/dynamic shift of cdm.md §1.1)")


def flow_match_shift(config, nominal: list[float], mu: float | None) -> list[float]:
    """Nominal σ → the σ that ``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=nominal, mu=mu)`` runs.

    Static: s(σ) = S·σ / (1 + (S−1)·σ). Dynamic (``use_dynamic_shifting``): s(σ) = e^μ / (e^μ + 1/σ − 1)
    ("exponential") or μ / (μ + 1/σ − 1) ("linear").
    """
    if not config.get("use_dynamic_shifting"):
        return [float(static_shift(s, float(config.get("shift", 1.0)))) for s in nominal]
    if config.get("time_shift_type", "exponential") == "exponential":
        return [math.exp(mu) / (math.exp(mu) + (1 / s - 1)) for s in nominal]
    return [mu / (mu + (1 / s - 1)) for s in nominal]


# ------------------------------------------------------------------------------------------------
# Shared plumbing of diffusers pipeline adapters.

class DiffusersBackbone(Backbone):
    """A diffusers text-to-image pipeline: frozen teacher transformer, text encoders and VAE."""

    pipeline_class: ClassVar[str]  # name in the ``diffusers`` namespace
    default_model: ClassVar[str]
    default_max_shift: ClassVar[float] = 1.16  # the pipeline's fallback for ``max_shift`` in μ
    pipeline_load_kwargs: ClassVar[dict[str, Any]] = {}
    prompt_cache_size: ClassVar[int] = 4  # LRU entries (one per distinct prompt batch)
    lora_target_modules = ATTN_LORA_TARGETS

    def __init__(self, options: BackboneOptions):
        super().__init__(options)
        import diffusers

        self.model_id = options.model or self.default_model
        pipe = load_pipeline(getattr(diffusers, self.pipeline_class), self.name, self.model_id, options,
                             **self.pipeline_load_kwargs)
        pipe.set_progress_bar_config(disable=True)
        pipe.to(self.device)
        for component in pipe.components.values():
            if isinstance(component, nn.Module):
                component.eval().requires_grad_(False)
        pipe.vae.enable_slicing()  # decode one image at a time: same result, bounded memory
        self.pipe = pipe
        check_scheduler_config(pipe.scheduler.config)
        self.shift = float(pipe.scheduler.config.get("shift", 1.0))
        self.resolution = self._resolve_resolution(options.resolution)
        self.shift_mu = (calculate_mu(self.image_seq_len, pipe.scheduler.config, self.default_max_shift)
                         if pipe.scheduler.config.get("use_dynamic_shifting") else None)
        self._prompt_cache: OrderedDict[tuple[str, ...], Cond] = OrderedDict()
        self._log_schedules()

    # -- what subclasses provide -----------------------------------------------------------------
    @abstractmethod
    def _resolve_resolution(self, resolution: int | None) -> int:
        """The image side in pixels (``options.resolution`` or the model's default), validated."""

    @property
    @abstractmethod
    def image_seq_len(self) -> int:
        """Image tokens the transformer sees (μ of the dynamic shift depends on it)."""

    @abstractmethod
    def _encode(self, prompts: list[str]) -> Cond:
        """Encode a batch of prompts (no grad, uncached)."""

    def inference_recipe(self) -> dict[str, dict[str, Any]]:
        """How to call the exported pipeline so it matches this adapter: from_pretrained kwargs, pipeline
        attributes to set, and ``__call__`` kwargs (besides prompt, steps, sigmas and guidance)."""
        return {"from_pretrained_kwargs": {}, "attributes": {},
                "call_kwargs": {"height": self.resolution, "width": self.resolution}}

    @staticmethod
    def build_tiny_pipeline(path: Path) -> Path:
        """Save a tiny random pipeline of this backbone's class at ``path`` (tests); returns ``path``."""
        raise NotImplementedError

    @classmethod
    def tiny_pipeline(cls, workdir: Path) -> Path:
        """The folder of this backbone's tiny pipeline: built under ``workdir`` once per process, then reused."""
        folder = _TINY_BUILT.get(cls.name)
        if folder is None or not folder.is_dir():
            folder = _TINY_BUILT[cls.name] = cls.build_tiny_pipeline(Path(workdir) / f"tiny-{cls.name}")
        return folder

    @classmethod
    def tiny(cls, workdir: Path) -> "DiffusersBackbone":
        """This adapter on its tiny pipeline (``tiny_pipeline``), at ``TINY_RESOLUTION`` and ``TINY_TEXT_LEN``."""
        return cls(BackboneOptions(model=str(cls.tiny_pipeline(workdir)), resolution=TINY_RESOLUTION,
                                   max_sequence_length=TINY_TEXT_LEN))

    # -- the protocol ------------------------------------------------------------------------------
    @property
    def teacher(self) -> nn.Module:
        return self.pipe.transformer

    def encode_prompts(self, prompts: list[str]) -> Cond:
        key = tuple(prompts)
        if key in self._prompt_cache:
            self._prompt_cache.move_to_end(key)
            return self._prompt_cache[key]
        with torch.no_grad():
            cond = self._encode(list(prompts))
        self._prompt_cache[key] = cond
        while len(self._prompt_cache) > self.prompt_cache_size:
            self._prompt_cache.popitem(last=False)
        return cond

    def shift_sigmas(self, nominal: list[float]) -> list[float]:
        return flow_match_shift(self.pipe.scheduler.config, nominal, self.shift_mu)

    @torch.no_grad()
    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        z = latents.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return ((vae.decode(z, return_dict=False)[0].float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def _vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] → normalised VAE latents (the posterior mean): (z − shift)·scale."""
        vae = self.pipe.vae
        z = vae.encode((images * 2 - 1).to(self.device, vae.dtype), return_dict=False)[0].mode()
        return (z.float() - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor

    @property
    def image_resolution(self) -> int:
        return self.resolution

    def trainable_copy(self) -> nn.Module:
        """Full fine-tuning: an fp32 copy of the teacher. LoRA (``lora_rank > 0``): a copy of the teacher in its
        own dtype, frozen, with fp32 peft adapters on ``lora_target_modules`` as the only trainable weights."""
        if not self.options.lora_rank:
            net = super().trainable_copy()
        else:
            from peft import LoraConfig

            net = copy.deepcopy(self.teacher).requires_grad_(False)
            rank = self.options.lora_rank
            net.add_adapter(LoraConfig(r=rank, lora_alpha=self.options.lora_alpha or rank,
                                       target_modules=list(self.lora_target_modules), init_lora_weights=True))
            for name, p in net.named_parameters():
                if "lora_" in name:
                    p.data = p.data.float()
                    p.requires_grad_(True)
            net.train()
        if self.options.gradient_checkpointing:
            net.enable_gradient_checkpointing()
        return net

    def net_state_dict(self, net: nn.Module) -> dict[str, torch.Tensor]:
        """Full mode: the whole state dict. LoRA mode: the adapter weights only (peft key names), taken from
        the full state (``full_model_state``), so it works on a DDP-wrapped network too."""
        if not self.options.lora_rank:
            return super().net_state_dict(net)
        from peft.utils import get_peft_model_state_dict

        from cdmbench.checkpoint import full_model_state

        return dict(get_peft_model_state_dict(getattr(net, "module", net), state_dict=full_model_state(net)))

    def load_net_state(self, net: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Full mode: the whole state dict, strictly. LoRA mode: the adapter weights, with every adapter key of
        ``net`` present in ``state`` at its shape and nothing else (a mismatch is a ``CdmbenchError``)."""
        if not self.options.lora_rank:
            return super().load_net_state(net, state)
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

        from cdmbench.checkpoint import state_mismatch

        net = getattr(net, "module", net)
        mismatch = state_mismatch(get_peft_model_state_dict(net), state)
        if mismatch:
            raise CdmbenchError(f"LoRA weights do not match the {self.name} backbone with lora_rank="
                                f"{self.options.lora_rank}: {mismatch}")
        set_peft_model_state_dict(net, state)
        loaded = get_peft_model_state_dict(net)
        if any(not torch.equal(loaded[k].to(state[k]), state[k]) for k in state):
            raise CdmbenchError(f"LoRA weights did not load into the {self.name} backbone")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "model": self.model_id, "resolution": self.resolution,
                "dynamic_shift_mu": self.shift_mu, "lora_rank": self.options.lora_rank,
                "max_sequence_length": self.options.max_sequence_length}

    def _log_schedules(self) -> None:
        for steps in (1, 2, 4):
            s = self.schedule(steps)
            logger.info("%s: %d-step σ nominal %s → effective %s", self.name, steps,
                        [round(x, 4) for x in s.nominal], [round(x, 4) for x in s.effective])


# ------------------------------------------------------------------------------------------------
# Tiny pipelines for tests (``Backbone.tiny``): built from configs and saved with ``save_pretrained``, so
# they load through the same ``from_pretrained`` path as a hub id. Recipe and dimension rules: shared
# notes/deps.md ("Tiny local pipelines"). Tokenizers are byte-level with an empty merge list, built
# locally, so nothing touches the hub.

_TINY_BUILT: dict[str, Path] = {}  # backbone name → its tiny pipeline folder, built once per process
TINY_RESOLUTION = 32  # pixels of the tiny pipelines: VAE ×2, then patch 2 (SD3) or 2×2 packing (LongCat) → 8×8 tokens
TINY_TEXT_LEN = 16  # text tokens the tiny backbones encode (the real defaults are 256 / 512)


def tiny_byte_chars() -> list[str]:
    """The byte-level alphabet: the whole vocabulary of the tiny pipelines' tokenizers."""
    from tokenizers.pre_tokenizers import ByteLevel

    return sorted(ByteLevel.alphabet())


def eval_modules(*modules: nn.Module) -> None:
    for m in modules:
        m.eval()  # freshly built modules are in train mode (T5 dropout)

