"""Every compatibility fix that image-reward 1.5 needs under transformers 5, in one place.

image-reward is installed apart (``pip install --no-deps image-reward==1.5 fairscale==0.4.13``, see
``scripts/install_scorers.sh``). Its package ``__init__`` imports OpenAI ``clip``, ``datasets``, diffusers
and its ReFL trainer, none of which scoring needs, and its BLIP text encoder predates transformers 5.
The fixes, each undone or confined to a private copy of the modules:

1. The modules are imported under a private package name (``_cdmbench_imagereward``) without running
   ``ImageReward/__init__.py`` or ``ImageReward/models/__init__.py``; ``sys.modules["ImageReward"]`` is
   never touched.
2. ``med.py`` imports ``apply_chunking_to_forward``, ``prune_linear_layer`` and
   ``find_pruneable_heads_and_indices`` from ``transformers.modeling_utils``; they are put there only
   while ``med.py`` is imported (the first two from ``transformers.pytorch_utils``; the third, used only
   by head pruning, raises).
3. Its ``BertModel`` calls ``init_weights()`` without ``post_init()``, and uses ``invert_attention_mask``
   and ``get_head_mask`` (removed from ``PreTrainedModel``): the private ``BertModel`` class gets those
   methods, with the transformers 4 semantics.
4. ``BLIP_Pretrain`` builds its tokenizer with ``BertTokenizer.from_pretrained("bert-base-uncased")``,
   which offline silently returns a special-tokens-only tokenizer, and reads the removed
   ``additional_special_tokens_ids``: the tokenizer is built here from a local vocabulary and its size
   is checked against ``med_config.json``.
5. ``ImageReward`` hard-codes a ViT-L vision tower; the tower is built from a ``VitSpec`` (read from the
   checkpoint's shapes), so the same code loads the real weights and small test models.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch

from cdmbench.errors import CdmbenchError, MissingWeightsError

INSTALL_HINT = "pip install --no-deps image-reward==1.5 fairscale==0.4.13 (scripts/install_scorers.sh)"
_ALIAS = "_cdmbench_imagereward"


class MissingPackageError(CdmbenchError, ImportError):
    """image-reward (or one of its --no-deps requirements) is not installed: one line at the CLI."""

_VISUAL = "blip.visual_encoder."
TEXT_WIDTH = 768  # ImageReward's reward head is MLP(768): the BERT hidden size is fixed
PROMPT_TOKENS = 35  # ImageReward.score pads/truncates prompts to 35 tokens


# --------------------------------------------------------------------------------------------------
# 1-3: import the modules under a private name, with the transformers 5 shims


def _bare_package(name: str, folder: Path) -> ModuleType:
    init = folder / "__init__.py"
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)  # not executed: its __init__ imports clip/datasets/diffusers
    sys.modules[name] = module
    return module


def _no_head_pruning(*args, **kwargs):
    raise CdmbenchError("head pruning is not supported by cdmbench's ImageReward loader")


@contextlib.contextmanager
def _legacy_modeling_utils():
    """Temporarily put the names ``med.py`` imports back into ``transformers.modeling_utils``."""
    import transformers.modeling_utils as mu
    import transformers.pytorch_utils as pu

    legacy = {
        "apply_chunking_to_forward": getattr(pu, "apply_chunking_to_forward", None),
        "prune_linear_layer": getattr(pu, "prune_linear_layer", None),
        "find_pruneable_heads_and_indices": getattr(pu, "find_pruneable_heads_and_indices", _no_head_pruning),
    }
    added = [n for n in legacy if not hasattr(mu, n)]
    for n in added:
        if legacy[n] is None:
            raise ImportError(f"transformers {_transformers_version()} has no {n}; image-reward cannot be imported")
        setattr(mu, n, legacy[n])
    try:
        yield
    finally:
        for n in added:
            delattr(mu, n)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def invert_attention_mask(self, encoder_attention_mask: torch.Tensor) -> torch.Tensor:
    """transformers 4 ``ModuleUtilsMixin.invert_attention_mask``: 1 = attend → 0, 0 = masked → dtype min."""
    m = encoder_attention_mask
    ext = m[:, None, :, :] if m.dim() == 3 else m[:, None, None, :]
    ext = ext.to(dtype=self.dtype)
    return (1.0 - ext) * torch.finfo(self.dtype).min


def get_head_mask(self, head_mask, num_hidden_layers: int, is_attention_chunked: bool = False):
    """transformers 4 ``ModuleUtilsMixin.get_head_mask``: None → [None] * layers, else 5-D per layer."""
    if head_mask is None:
        return [None] * num_hidden_layers
    if head_mask.dim() == 1:
        head_mask = head_mask[None, None, :, None, None].expand(num_hidden_layers, -1, -1, -1, -1)
    elif head_mask.dim() == 2:
        head_mask = head_mask[:, None, :, None, None]
    if head_mask.dim() != 5:
        raise CdmbenchError(f"head_mask must have 1 or 2 dims, got {head_mask.dim()}")
    head_mask = head_mask.to(dtype=self.dtype)
    return head_mask.unsqueeze(-1) if is_attention_chunked else head_mask


def _init_weights_with_post_init(self) -> None:
    """``post_init`` sets what transformers 5's ``init_weights`` reads (``all_tied_weights_keys``) and then
    calls ``init_weights`` again; the second call runs the normal initialisation."""
    from transformers import PreTrainedModel

    if "all_tied_weights_keys" not in self.__dict__:
        self.post_init()
        return
    PreTrainedModel.init_weights(self)


@functools.cache
def import_imagereward() -> SimpleNamespace:
    """The image-reward classes scoring needs: ``ImageReward``, ``transform`` (its preprocessing factory),
    and the modules ``blip_pretrain``, ``med``, ``vit`` (private copies, shims applied)."""
    spec = importlib.util.find_spec("ImageReward")
    if spec is None or spec.origin is None:
        raise MissingPackageError(f"ImageReward needs the image-reward package: {INSTALL_HINT}")
    root = Path(spec.origin).parent
    _bare_package(_ALIAS, root)
    _bare_package(f"{_ALIAS}.models", root / "models")
    try:
        with _legacy_modeling_utils():
            ir = importlib.import_module(f"{_ALIAS}.ImageReward")
    except ImportError as e:  # fairscale or timm missing, or a transformers without the legacy helpers
        for name in [m for m in sys.modules if m == _ALIAS or m.startswith(_ALIAS + ".")]:
            del sys.modules[name]
        raise MissingPackageError(f"image-reward could not be imported ({e}); install with {INSTALL_HINT}") from e
    med = sys.modules[f"{_ALIAS}.models.BLIP.med"]
    med.BertModel.init_weights = _init_weights_with_post_init
    for name, fn in (("invert_attention_mask", invert_attention_mask), ("get_head_mask", get_head_mask)):
        if not hasattr(med.BertModel, name):
            setattr(med.BertModel, name, fn)
    return SimpleNamespace(
        ImageReward=ir.ImageReward,
        transform=ir._transform,
        blip_pretrain=sys.modules[f"{_ALIAS}.models.BLIP.blip_pretrain"],
        med=med,
        vit=sys.modules[f"{_ALIAS}.models.BLIP.vit"],
    )


# --------------------------------------------------------------------------------------------------
# 4: the tokenizer


def load_bert_tokenizer(path: str | Path):
    """bert-base-uncased's tokenizer from a local folder (HF layout) or a ``vocab.txt``, plus BLIP's
    special tokens ([DEC] as bos, [ENC] as ``enc_token_id``), as ``blip.init_tokenizer`` builds it."""
    from transformers import BertTokenizer

    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "vocab.txt").is_file() and not (p / "tokenizer.json").is_file():
            raise MissingWeightsError(f"BERT tokenizer folder {p} has neither vocab.txt nor tokenizer.json")
        tok = BertTokenizer.from_pretrained(str(p), local_files_only=True)
    elif p.is_file():
        words = p.read_text(encoding="utf-8").splitlines()
        tok = BertTokenizer(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    else:
        raise MissingWeightsError(f"BERT tokenizer (bert-base-uncased vocab.txt or folder) not found at {p}")
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tok.enc_token_id = tok.convert_tokens_to_ids("[ENC]")
    return tok


def check_tokenizer(tokenizer, vocab_size: int, source: str) -> None:
    """Fail clearly when the tokenizer does not match the text encoder (e.g. the special-tokens-only
    tokenizer ``from_pretrained`` returns offline)."""
    if len(tokenizer) != vocab_size:
        raise MissingWeightsError(
            f"BERT tokenizer from {source} has {len(tokenizer)} tokens with BLIP's [DEC]/[ENC], but med_config "
            f"expects vocab_size={vocab_size} (bert-base-uncased: 30522 + 2); point bert_tokenizer_path at "
            f"bert-base-uncased's vocab.txt or folder"
        )


# --------------------------------------------------------------------------------------------------
# 5: the model


@dataclass(frozen=True)
class VitSpec:
    """BLIP's ``VisionTransformer`` size (ImageReward v1.0 = ``VIT_LARGE``)."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 1024
    depth: int = 24
    heads: int = 16


VIT_LARGE = VitSpec()


def vit_spec_from_state_dict(state_dict: dict[str, torch.Tensor]) -> VitSpec:
    """Read the vision tower's size from checkpoint shapes (heads = width / 64, as in BLIP's ViTs)."""
    try:
        pos = state_dict[_VISUAL + "pos_embed"]  # (1, 1 + (image/patch)², width)
        patch = state_dict[_VISUAL + "patch_embed.proj.weight"]  # (width, 3, patch, patch)
    except KeyError as e:
        raise CdmbenchError(f"not an ImageReward checkpoint: it lacks {e.args[0]}") from None
    width, patch_size = int(patch.shape[0]), int(patch.shape[-1])
    grid = round((pos.shape[1] - 1) ** 0.5)
    blocks = _VISUAL + "blocks."
    depth = 1 + max(int(k[len(blocks):].split(".")[0]) for k in state_dict if k.startswith(blocks))
    if grid * grid != pos.shape[1] - 1 or width % 64:
        raise CdmbenchError(f"unexpected ImageReward vision tower: pos_embed {tuple(pos.shape)}, width {width}")
    return VitSpec(image_size=grid * patch_size, patch_size=patch_size, width=width, depth=depth, heads=width // 64)


def build_imagereward(
    med_config: str | Path, tokenizer, vit: VitSpec = VIT_LARGE, device: str = "cpu"
) -> torch.nn.Module:
    """A randomly initialised ``ImageReward`` with the given tokenizer and vision tower."""
    mods = import_imagereward()
    cfg = json.loads(Path(med_config).read_text())
    if cfg.get("hidden_size") != TEXT_WIDTH:
        raise CdmbenchError(
            f"ImageReward's reward head needs a BERT hidden_size of {TEXT_WIDTH}; "
            f"{med_config} has {cfg.get('hidden_size')}"
        )
    check_tokenizer(tokenizer, int(cfg["vocab_size"]), "the given tokenizer")

    def create_vit(vit_name, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
        tower = mods.vit.VisionTransformer(
            img_size=vit.image_size, patch_size=vit.patch_size, embed_dim=vit.width, depth=vit.depth,
            num_heads=vit.heads,
            use_grad_checkpointing=use_grad_checkpointing, ckpt_layer=ckpt_layer, drop_path_rate=drop_path_rate,
        )
        return tower, vit.width

    bp = mods.blip_pretrain
    saved = bp.init_tokenizer, bp.create_vit
    bp.init_tokenizer, bp.create_vit = (lambda: tokenizer), create_vit
    try:
        model = mods.ImageReward(med_config=str(med_config), device=device)
    finally:
        bp.init_tokenizer, bp.create_vit = saved
    model.preprocess = mods.transform(vit.image_size)
    return model.to(device).eval()


TINY_WORDS = "a an the red green blue yellow circle square triangle in at top bottom left right small large photo of dog"
TINY_VOCAB = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TINY_WORDS.split())
TINY_VIT = VitSpec(image_size=64, patch_size=32, width=64, depth=2, heads=1)


def tiny_med_config(vocab_size: int) -> dict:
    """ImageReward's med_config.json with a 1-layer BERT (hidden 768 is fixed by the reward head)."""
    return {
        "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "hidden_size": TEXT_WIDTH, "initializer_range": 0.02, "intermediate_size": 64,
        "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert", "num_attention_heads": 12,
        "num_hidden_layers": 1, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": vocab_size,
        "encoder_width": 768, "add_cross_attention": True,
    }


def build_tiny_imagereward(folder: str | Path, seed: int = 0) -> torch.nn.Module:
    """A random small ImageReward (tests), with ``vocab.txt`` and ``med_config.json`` written to ``folder``
    as a user's files are; its reward head is widened so that prompts and images move the score."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n")
    (folder / "med_config.json").write_text(json.dumps(tiny_med_config(len(TINY_VOCAB) + 2)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_imagereward(folder / "med_config.json", load_bert_tokenizer(folder / "vocab.txt"), TINY_VIT)
        with torch.no_grad():  # the stock head init gives near-constant rewards
            for p in model.mlp.parameters():
                p.normal_(0, 0.3)
    return model.eval()


def load_imagereward(
    checkpoint: str | Path, med_config: str | Path, tokenizer_path: str | Path, device: str = "cpu"
) -> torch.nn.Module:
    """ImageReward from local files: the ``ImageReward.pt`` state dict, its ``med_config.json`` and
    bert-base-uncased's tokenizer. Every weight of the model must come from the checkpoint."""
    checkpoint = Path(checkpoint).expanduser()
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    tokenizer = load_bert_tokenizer(tokenizer_path)
    vocab_size = int(json.loads(Path(med_config).read_text())["vocab_size"])
    check_tokenizer(tokenizer, vocab_size, str(tokenizer_path))
    model = build_imagereward(med_config, tokenizer, vit_spec_from_state_dict(state), device)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing:
        raise CdmbenchError(f"{checkpoint} lacks {len(missing)} ImageReward weights, e.g. {missing[:3]}")
    return model.eval()
