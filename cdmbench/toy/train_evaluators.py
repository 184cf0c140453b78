"""Train the toy evaluators from a seed: attribute classifier, toy CLIP and toy-FID reference statistics.

Both networks train on fresh procedural batches (``shapes.ShapesStream``, caption templates varied).
The CLIP also sees a light augmentation (pixel noise, slight blur) so that it scores slightly imperfect
generations by their content; the classifier does not, because its features are the toy FID's and
must stay sensitive to noise and blur. Results are deterministic given the seed (and the torch build
and thread count). Each file carries its training record as JSON under the safetensors metadata key
``cdmbench``.

Reproduce the shipped assets (~6 + ~8 + 1 + 1 minutes on one CPU thread)::

    OMP_NUM_THREADS=1 python -m cdmbench.toy.train_evaluators --out-dir cdmbench/assets --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cdmbench.io import save_safetensors
from cdmbench.toy import evaluators as ev
from cdmbench.toy import shapes
from cdmbench.toy.shapes import ATTRIBUTES, ShapesStream
from cdmbench.types import ATTRS

FID_REF_SEEDS = tuple(range(1000, 1050))  # 96 prompts × 50 seeds = 4,800 real images
HELDOUT_SEED = 99_991  # stream seed of the held-out images measured at the end of training


def augment(images: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Light, attribute-preserving augmentation of (B, 3, 32, 32) images in [0, 1].

    With probability ``p`` each: blend towards a 3×3 box blur (amount ~ U(0, 1)), and add Gaussian
    pixel noise (std ~ U(0, 0.04)).
    """
    if p == 0:
        return images
    b = images.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    blur = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    amount = (u(b) < p).float() * u(b)
    x = torch.lerp(images, blur, amount.view(b, 1, 1, 1))
    std = (u(b) < p).float() * 0.04 * u(b)
    x = x + std.view(b, 1, 1, 1) * torch.randn(x.shape, generator=generator)
    return x.clamp(0, 1)


def cosine_lr(step: int, steps: int, warmup: int) -> float:
    """LR multiplier: linear warmup, then cosine decay to 5 %."""
    warm = min(1.0, (step + 1) / warmup)
    return warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))


def heldout_batch(n: int, seed: int = HELDOUT_SEED) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """n fresh real (images, captions, attrs), disjoint in practice from any training stream."""
    return next(ShapesStream(seed=seed, batch_size=n))


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    disable=not enabled)


def _train_loop(name: str, params: list, loss_fn, steps: int, lr: float, weight_decay: float,
                warmup: int, progress: bool, after_step=None) -> list[float]:
    """AdamW with warmup + cosine decay over ``steps`` calls of ``loss_fn(step) -> loss``; returns losses."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: cosine_lr(k, steps, warmup))
    losses: list[float] = []
    with _progress(progress) as bar:
        task = bar.add_task(name, total=steps)
        for step in range(steps):
            loss = loss_fn(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            if after_step is not None:
                after_step()
            losses.append(loss.item())
            if step % 25 == 0 or step == steps - 1:
                recent = losses[-50:]
                bar.update(task, completed=step + 1, description=f"{name} loss {sum(recent) / len(recent):.4f}")
    return losses


# ----------------------------------------------------------------------------------------------------
# Attribute classifier: sum of the four heads' cross-entropies.


def classifier_loss(logits: dict[str, torch.Tensor], attrs: torch.Tensor) -> torch.Tensor:
    """Sum over attributes of the cross-entropy of each head against its (B,) labels."""
    return sum(F.cross_entropy(logits[a], attrs[:, i]) for i, a in enumerate(ATTRIBUTES))


def train_classifier(
    out: str | Path,
    steps: int = 1500,  # optimizer steps
    seed: int = 0,  # model init and data stream
    batch_size: int = 128,
    lr: float = 2e-3,  # AdamW peak learning rate (100-step warmup, cosine decay to 5 %)
    width: int = 32,  # channels of the first conv; the trunk goes w → 2w → 2w → 4w
    num_features: int = 128,  # width of the penultimate (toy-FID) features
    augment_p: float = 0.0,  # probability of each light augmentation; 0 keeps the toy-FID features
    # sensitive to pixel noise and blur (a noise-trained classifier partly ignores them)
    heldout: int = 2048,  # fresh real images on which the final accuracy is measured
    progress: bool = True,
) -> dict:
    """Train and save the attribute classifier; returns the record written into the file metadata."""
    torch.manual_seed(seed)
    model = ev.ShapeClassifier(width=width, num_features=num_features).train()
    data = ShapesStream(seed=seed, batch_size=batch_size)
    g = torch.Generator().manual_seed(seed + 1)

    def loss_fn(step: int) -> torch.Tensor:
        images, _, attrs = next(data)
        return classifier_loss(model(augment(images, g, augment_p)), attrs)

    t0 = time.time()
    losses = _train_loop("toy classifier", list(model.parameters()), loss_fn, steps, lr, 1e-4, 100, progress)
    minutes = (time.time() - t0) / 60
    model.eval()
    images, _, attrs = heldout_batch(heldout)
    pred = ev.attribute_predictions(model, images)
    record = {
        "arch": model.arch(), "steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr,
        "augment_p": augment_p, "train_minutes": round(minutes, 2),
        "final_loss": round(sum(losses[-100:]) / len(losses[-100:]), 5),
        "heldout_n": heldout, "heldout_accuracy": round(float(ev.attribute_accuracy(pred, attrs).mean()), 5),
        "heldout_per_attribute": {k: round(v, 5) for k, v in ev.per_attribute_accuracy(pred, attrs).items()},
        "data": shapes.DATA_VERSION, "torch": torch.__version__,
    }
    save_safetensors(model.state_dict(), out, metadata={ev.METADATA_KEY: json.dumps(record)})
    return record


# ----------------------------------------------------------------------------------------------------
# Toy CLIP: symmetric InfoNCE (Radford et al. 2021) with multi-positive targets.


def multi_positive_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                             logit_scale: torch.Tensor, attrs: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where every pair with identical attributes is a positive.

    A batch of B random captions over 96 attribute combinations repeats combinations, and plain CLIP
    would push an image away from its duplicate's caption. The target of row i is uniform over
    {j : attrs_j = attrs_i} (as in UniCL, Yang et al. 2022). Features are L2-normalised (B, D).
    """
    logits = logit_scale.exp() * image_features @ text_features.T
    pos = (attrs[:, None, :] == attrs[None, :, :]).all(dim=-1).float()  # symmetric (B, B)
    target = pos / pos.sum(dim=1, keepdim=True)
    loss_i = -(target * logits.log_softmax(dim=1)).sum(dim=1).mean()
    loss_t = -(target * logits.T.log_softmax(dim=1)).sum(dim=1).mean()
    return (loss_i + loss_t) / 2


def grammar_token_ids(tokenizer) -> torch.Tensor:
    """Sorted token ids of every caption of the grammar (all templates), the empty caption and padding."""
    import itertools

    combos = itertools.product(*(range(shapes.NUM_CLASSES[a]) for a in ATTRIBUTES))
    caps = [shapes.caption(c, t) for c in combos for t in range(len(shapes._TEMPLATES))] + [""]
    return tokenizer(caps).unique()


@torch.no_grad()
def clip_heldout_metrics(model, preprocess, tokenizer, n: int, seed: int = HELDOUT_SEED) -> dict[str, float]:
    """Caption ranking and zero-shot attribute-combination accuracy on n fresh real images.

    ``rank_accuracy``: fraction of images whose cosine with their own caption beats the cosine with the
    caption of another image (a fixed random derangement) whose attributes differ (pairs with equal
    attributes are skipped). ``top1_96``: fraction whose best match among the 96 eval prompts is theirs.
    """
    images, caps, attrs = heldout_batch(n, seed)
    g = torch.Generator().manual_seed(seed)
    perm = _derangement(n, g)
    differ = (attrs != attrs[perm]).any(dim=1)
    img = model.encode_image(preprocess(images), normalize=True)
    txt = model.encode_text(tokenizer(caps), normalize=True)
    own = (img * txt).sum(dim=1)
    other = (img * txt[perm]).sum(dim=1)
    prompts = shapes.eval_prompts()
    bank = model.encode_text(tokenizer([p.text for p in prompts]), normalize=True)
    best = (img @ bank.T).argmax(dim=1)
    prompt_attrs = torch.tensor([p.meta[ATTRS] for p in prompts])
    return {
        "rank_accuracy": float((own > other)[differ].float().mean()),
        "top1_96": float((prompt_attrs[best] == attrs).all(dim=1).float().mean()),
        "mean_cos_true": float(own.mean()),
        "mean_cos_other": float(other[differ].mean()),
    }


def _derangement(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random permutation with no fixed point: a random cyclic shift of a random order."""
    order = torch.randperm(n, generator=generator)
    perm = torch.empty(n, dtype=torch.long)
    perm[order] = order.roll(1)
    return perm


def train_clip(
    out: str | Path,
    steps: int = 1500,  # optimizer steps
    seed: int = 0,  # model init and data stream
    batch_size: int = 128,
    lr: float = 1e-3,  # AdamW peak learning rate (100-step warmup, cosine decay to 5 %)
    weight_decay: float = 0.05,
    augment_p: float = 0.5,  # probability of each light augmentation (robust to imperfect generations)
    heldout: int = 2048,  # fresh real images on which the final metrics are measured
    progress: bool = True,
) -> dict:
    """Train and save the toy CLIP (architecture: ``assets/open_clip/toy-clip.json``); returns its record."""
    import open_clip

    torch.manual_seed(seed)
    model = ev.build_toy_clip().train()
    preprocess = ev.ToyClipPreprocess.for_model(model)
    tokenizer = open_clip.get_tokenizer(ev.CLIP_MODEL_NAME)
    data = ShapesStream(seed=seed, batch_size=batch_size)
    g = torch.Generator().manual_seed(seed + 1)

    def loss_fn(step: int) -> torch.Tensor:
        images, caps, attrs = next(data)
        img = model.encode_image(preprocess(augment(images, g, augment_p)), normalize=True)
        txt = model.encode_text(tokenizer(caps), normalize=True)
        return multi_positive_clip_loss(img, txt, model.logit_scale, attrs)

    def clamp_logit_scale() -> None:  # open_clip's training clamps the temperature at 100
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    t0 = time.time()
    losses = _train_loop("toy CLIP", list(model.parameters()), loss_fn, steps, lr, weight_decay, 100, progress,
                         after_step=clamp_logit_scale)
    minutes = (time.time() - t0) / 60
    token_ids = grammar_token_ids(tokenizer)
    sd = ev.clip_state_dict_for_file(model, token_ids)
    # measure what ships: the fp16, row-pruned weights as the loader restores them
    model.load_state_dict(ev.clip_state_dict_from_file(sd, model.token_embedding.num_embeddings))
    metrics = clip_heldout_metrics(model.eval(), preprocess, tokenizer, heldout)
    record = {
        "model": ev.CLIP_MODEL_NAME,
        "config": json.loads((ev.assets_dir() / "open_clip" / "toy-clip.json").read_text()),
        "steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
        "augment_p": augment_p, "train_minutes": round(minutes, 2),
        "final_loss": round(sum(losses[-100:]) / len(losses[-100:]), 5),
        "logit_scale": round(float(model.logit_scale.detach().exp()), 3), "heldout_n": heldout,
        **{f"heldout_{k}": round(v, 5) for k, v in metrics.items()},
        "storage": "fp16; token_embedding rows outside token_embedding.ids are zero", "data": shapes.DATA_VERSION, "torch": torch.__version__,
        "open_clip": open_clip.__version__,
    }
    save_safetensors(sd, out, metadata={ev.METADATA_KEY: json.dumps(record)})
    return record


# ----------------------------------------------------------------------------------------------------
# Toy-FID reference statistics of real images for the fixed eval prompt set.


def format_int_list(values: tuple[int, ...]) -> str:
    """'1000-1049' or '1,2,5-10': the inverse of ``seeding.parse_int_list`` for sorted unique ints."""
    parts, start = [], None
    for i, v in enumerate(values):
        start = v if start is None else start
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(v) if start == v else f"{start}-{v}")
            start = None
    return ",".join(parts)


def build_fid_reference(
    out: str | Path,
    classifier_path: str | Path | None = None,  # None: the shipped classifier asset
    seeds: tuple[int, ...] = FID_REF_SEEDS,  # real-image seeds per eval prompt
    progress: bool = True,
) -> dict:
    """Save float64 mean and covariance of classifier features of ``real_images_for(eval_prompts(), seeds)``."""
    from cdmbench.eval.metrics.fid import ReferenceStats

    classifier_path = Path(classifier_path) if classifier_path is not None else ev.default_classifier_path()
    classifier = ev.load_toy_classifier(classifier_path)
    prompts = shapes.eval_prompts()
    feats = []
    with _progress(progress) as bar:
        task = bar.add_task("toy FID reference", total=len(prompts))
        for p in prompts:  # one prompt at a time keeps memory flat
            with torch.no_grad():
                feats.append(classifier.features(shapes.real_images_for([p], list(seeds))).double())
            bar.advance(task)
    ref = ReferenceStats.from_features(torch.cat(feats), "toy")  # the eval FID's own statistics (np.cov, N − 1)
    mu, sigma = torch.from_numpy(ref.mu), torch.from_numpy(ref.sigma)
    record = {
        "version": ev.TOY_FID_VERSION, "extractor": "ShapeClassifier.features",
        "extractor_file": classifier_path.name,
        "extractor_sha256": ev.file_sha256(classifier_path), "num_features": classifier.num_features,
        "input": "float32 (B, 3, 32, 32) in [0, 1]", "prompt_set": shapes.PROMPT_SET_VERSION, "data": shapes.DATA_VERSION,
        "seeds": format_int_list(seeds),
        "n": len(prompts) * len(seeds),
    }
    save_safetensors({"mu": mu, "sigma": sigma}, out, metadata={ev.METADATA_KEY: json.dumps(record)})
    return record


STEPS = ("classifier", "clip", "fid-reference", "factors")  # the asset builds, in dependency order


def train_all(out_dir: str | Path, seed: int = 0, progress: bool = True,
              only: tuple[str, ...] | None = None) -> dict[str, dict]:
    """Train the classifier and CLIP, build the FID reference, then fit the free-factor regressor, into
    ``out_dir`` (asset file names). ``only``: a subset of ``STEPS`` (e.g. ("factors",), ~1 minute)."""
    from cdmbench.errors import CdmbenchError
    from cdmbench.toy import factors

    steps = STEPS if only is None else tuple(only)
    bad = [s for s in steps if s not in STEPS]
    if bad or not steps:
        raise CdmbenchError(f"only: unknown step(s) {', '.join(bad) or '(none)'}; valid steps: {', '.join(STEPS)}")
    out_dir = Path(out_dir)
    records = {}
    if "classifier" in steps:
        records["classifier"] = train_classifier(out_dir / ev.CLASSIFIER_ASSET, seed=seed, progress=progress)
    if "clip" in steps:
        records["clip"] = train_clip(out_dir / ev.CLIP_ASSET, seed=seed, progress=progress)
    if "fid-reference" in steps:
        records["fid_reference"] = build_fid_reference(out_dir / ev.FID_REF_ASSET, out_dir / ev.CLASSIFIER_ASSET,
                                                       progress=progress)
    if "factors" in steps:
        records["factors"] = factors.train_factor_regressor(out_dir / factors.FACTORS_ASSET, seed=seed,
                                                            progress=progress)
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, required=True, help="folder for the three asset files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(STEPS)}")
    args = parser.parse_args(argv)
    only = tuple(s.strip() for s in args.only.split(",")) if args.only else None
    print(json.dumps(train_all(args.out_dir, seed=args.seed, only=only), indent=2))


if __name__ == "__main__":
    main()
