"""Adding a metric or a backbone is one new file plus its registration: a throwaway metric and a throwaway
backbone, registered at run time, pass the same contract checks as the built-ins and evaluate through the
unchanged harness."""

import hashlib

import numpy as np
import torch
from torch import nn

from cdmbench.backbones import BACKBONES
from cdmbench.backbones.base import Backbone, BackboneOptions, Cond
from cdmbench.eval.metrics import METRICS, PerImageMetric
from cdmbench.testing import BACKBONE_CHECKS, METRIC_CHECKS, registered


class Brightness(PerImageMetric):
    """Mean pixel value per image (a metric that needs no model)."""

    higher_is_better = True
    protocol = "brightness|mean-pixel"

    def score_batch(self, images, prompts):
        return images.double().mean(dim=(1, 2, 3)).numpy()

    @classmethod
    def from_options(cls, evaluators, options=None):
        cls._require_applicable(evaluators)
        return cls()

    @classmethod
    def tiny(cls, workdir):
        return cls()


class PixelNet(nn.Module):
    """v̂ = conv([x, σ]) + a projection of the prompt embedding: a per-sample network on 3×8×8 pixels."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 3, 3, padding=1)
        self.text = nn.Linear(8, 3)

    def forward(self, x, sigma, embeds):
        s = sigma.to(x.dtype).view(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        return self.conv(torch.cat([x, s], dim=1)) + self.text(embeds)[:, :, None, None]


class PixelBackbone(Backbone):
    """A teacher of random weights in 3×8×8 pixel space; prompts embed as a hash-seeded vector."""

    def __init__(self, options: BackboneOptions = BackboneOptions()):
        super().__init__(options)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self._teacher = PixelNet().to(self.device).eval().requires_grad_(False)

    @property
    def teacher(self):
        return self._teacher

    @property
    def latent_shape(self):
        return (3, 8, 8)

    def encode_prompts(self, prompts):
        seeds = [int(hashlib.sha256(p.encode()).hexdigest()[:8], 16) for p in prompts]
        embeds = torch.stack([torch.randn(8, generator=torch.Generator().manual_seed(s)) for s in seeds])
        return Cond({"embeds": embeds.to(self.device)})

    def velocity(self, net, x, sigma, cond):
        return net(x, sigma, cond.batched["embeds"]).float()

    def decode(self, latents):
        return ((latents.float() + 1) / 2).clamp(0, 1)

    @classmethod
    def tiny(cls, workdir):
        return cls()


def test_a_throwaway_metric_and_backbone_pass_the_contracts_and_evaluate(tmp_path):
    from cdmbench.eval.harness import EvalConfig, run_eval
    from cdmbench.eval.results import read_results

    with registered(METRICS, "brightness", Brightness), registered(BACKBONES, "pixels", PixelBackbone):
        for check in METRIC_CHECKS:
            check(lambda: METRICS.get("brightness").tiny(tmp_path))
        backbone = BACKBONES.get("pixels").tiny(tmp_path)
        for check in BACKBONE_CHECKS:
            check(backbone)

        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a red apple\na blue car\na cat in a hat\n")
        cfg = EvalConfig(workspace=str(tmp_path / "ws"), arch="pixels", steps=(1,), teacher_steps=(2,),
                         metrics=("brightness", "attr_acc"), prompts=str(prompts), seeds=(0, 1), progress=False)
        df = read_results(run_eval(cfg)).set_index("metric")
    assert "brightness" not in METRICS and "pixels" not in BACKBONES  # registered for the block only
    ok = df.loc["brightness"]
    assert ok.status == "ok" and ok.run == "teacher-pixels" and ok.n == 6 and 0 < ok.value < 1
    assert ok.protocol == "brightness|mean-pixel" and np.isfinite(ok.ci_low) and ok.nfe == 2
    assert df.loc["attr_acc"].status == "not_applicable: the backbone declares no attribute predictor (Evaluators.attributes)"
