"""Fine detail: the high-frequency share of an image's spectral energy, relative to real images of the
same prompt.

Per image x (B, 3, H, W), with X_c = DFT(x_c − mean(x_c)) per channel and ρ(u, v) = √(u² + v²) the
radial frequency in cycles per pixel (0.5 at Nyquist on an axis):

    h(x) = Σ_c Σ_{ρ > ρ₀} |X_c|² / Σ_c Σ_{ρ > 0} |X_c|²

is the share of the non-DC energy above ρ₀ (default 0.25, half of Nyquist), which does not depend on
contrast. Blurring lowers it; pixel noise raises it. The score of a generated image is the symmetric
ratio min(r, 1/r) with r = h(x) / h̄_ref(prompt), h̄_ref the mean over reference images of its prompt:
1 means the real images' level of detail, lower means smoother (over-smoothing) or noisier. It is an
edge-sharpness diagnostic, not a realism score: an image of the wrong content with crisp edges scores 1.
"""

from __future__ import annotations

import numpy as np
import torch

from cdmbench.errors import CdmbenchError

DEFAULT_CUTOFF = 0.25  # cycles per pixel; Nyquist is 0.5


def high_frequency_share(images: torch.Tensor, cutoff: float = DEFAULT_CUTOFF) -> np.ndarray:
    """(B,) float64 share h(x) of non-DC spectral energy above ``cutoff`` cycles/pixel.

    A flat image (no non-DC energy) has share 0.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise CdmbenchError(f"images must be a (B, C, H, W) tensor, got {getattr(images, 'shape', type(images))}")
    if not 0.0 < cutoff < 0.5 * np.sqrt(2):
        raise CdmbenchError(f"cutoff must be in (0, 0.707) cycles per pixel, got {cutoff}")
    x = images.detach().double().cpu()
    x = x - x.mean(dim=(2, 3), keepdim=True)
    power = torch.fft.rfft2(x).abs().square().sum(dim=1)  # (B, H, W // 2 + 1)
    h, w = x.shape[2], x.shape[3]
    fy = torch.fft.fftfreq(h, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(w, dtype=torch.float64)[None, :]
    rho = (fy.square() + fx.square()).sqrt()
    # rfft2 stores the columns 1..W/2-1 once for two conjugate halves; weight them twice
    weight = torch.full((w // 2 + 1,), 2.0, dtype=torch.float64)
    weight[0] = 1.0
    if w % 2 == 0:
        weight[-1] = 1.0
    power = power * weight
    total = power.sum(dim=(1, 2))
    high = (power * (rho > cutoff)).sum(dim=(1, 2))
    share = torch.where(total > 0, high / total.clamp_min(1e-300), torch.zeros_like(total))
    return share.numpy()


def detail_ratio_score(share, reference_share) -> np.ndarray:
    """(B,) min(r, 1/r) with r = share / reference_share (per image against its prompt's reference mean)."""
    s = np.asarray(share, dtype=np.float64).reshape(-1)
    ref = np.broadcast_to(np.asarray(reference_share, dtype=np.float64), s.shape)
    if (ref <= 0).any():
        raise CdmbenchError("the reference images have no high-frequency energy; the detail ratio is undefined")
    r = s / ref
    return np.where(r > 0, np.minimum(r, 1.0 / np.maximum(r, 1e-300)), 0.0)


# --------------------------------------------------------------------------------------------------
# The registered metric

from typing import Callable, ClassVar  # noqa: E402

from cdmbench.eval.metrics import METRICS  # noqa: E402
from cdmbench.eval.metrics.base import Applicability, MetricOptions, PerImageMetric  # noqa: E402
from cdmbench.eval.metrics.sets import ReferenceImages  # noqa: E402
from cdmbench.types import ATTRS, Evaluators, Prompt  # noqa: E402

ReferenceShare = Callable[[Prompt], float]  # prompt -> mean high-frequency share of its real images


@METRICS.register("detail")
class Detail(PerImageMetric):
    """Fine detail: per image min(r, 1/r), r = high-frequency energy share / that of real images of its prompt.

    Args:
        reference_share: prompt → mean ``high_frequency_share`` of real images of that prompt.
        protocol: identity of the reference.
        cutoff: radial frequency (cycles per pixel) above which energy counts as fine detail.
    """

    higher_is_better: ClassVar[bool] = True

    def __init__(self, reference_share: ReferenceShare, protocol: str, cutoff: float = DEFAULT_CUTOFF):
        super().__init__()
        self.reference_share, self.cutoff = reference_share, cutoff
        self.protocol = f"detail|hf-share>{cutoff}|min(r,1/r)|{protocol}"

    @classmethod
    def applies_to(cls, evaluators: Evaluators) -> Applicability:
        a = super().applies_to(evaluators)
        if a and evaluators.references is None:
            return Applicability(False, "needs real images of each prompt; the backbone declares none (Evaluators.references)")
        return a

    def score_batch(self, images, prompts):
        ref = np.array([self.reference_share(p) for p in prompts])
        return detail_ratio_score(high_frequency_share(images, self.cutoff), ref)

    @classmethod
    def tiny(cls, workdir) -> "Detail":
        """A fixed reference share of 0.1 for every prompt."""
        return cls(lambda prompt: 0.1, "ref=constant-0.1")

    @classmethod
    def from_options(cls, evaluators: Evaluators, options: MetricOptions | None = None) -> "Detail":
        """The declared real images per prompt (``evaluators.references``), ``per_prompt`` of them per caption."""
        cls._require_applicable(evaluators)
        options = options or MetricOptions()
        real: ReferenceImages = evaluators.references(options.device)
        cache: dict = {}

        def reference_share(prompt: Prompt):
            key = (prompt.text, tuple(prompt.meta.get(ATTRS) or ()))
            if key not in cache:
                cache[key] = float(high_frequency_share(real.render(prompt, real.per_prompt)).mean())
            return cache[key]

        return cls(reference_share, f"ref={real.per_prompt}-{real.name}-per-caption")
