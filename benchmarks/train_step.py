"""Per method on the toy: training iteration time through the real loop, the time of the same
iterations' network passes alone (forwards timed inside ``Backbone.velocity``; forward-mode JVPs — sCM/rCM —
timed whole inside ``Backbone.velocity_jvp``, counted as network time and as JVP passes; text-encoder forwards of
prompts a method encodes itself inside ``Backbone.encode_prompts``, backwards inside
``Accelerator.backward``), passes per iteration by network, and the harness overhead ratio
(iteration time / network time; target ≤ 1.10). Prints a markdown table.

    python benchmarks/train_step.py [--methods cdm,dmd2] [--iters 20] [--batch 16]
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default=None)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import accelerate

    from cdmbench.backbones.toy import ToyBackbone
    from cdmbench.methods import METHODS
    from cdmbench.run import resolve_config
    from cdmbench.train import train

    names = args.methods.split(",") if args.methods else METHODS.names()
    stats = {"net_s": 0.0, "passes": collections.Counter(), "in_jvp": False}
    current = {}

    orig_velocity = ToyBackbone.velocity

    def timed_velocity(self, net, x, sigma, cond):
        if stats["in_jvp"]:  # inside velocity_jvp: timed and counted there, as one JVP pass
            return orig_velocity(self, net, x, sigma, cond)
        t = time.perf_counter()
        out = orig_velocity(self, net, x, sigma, cond)
        stats["net_s"] += time.perf_counter() - t
        m = current.get("method")
        role = "teacher" if net is self.teacher else next(
            (k for k, v in (m.nets.items() if m else []) if v is net), "other")
        stats["passes"][role] += 1
        return out

    orig_jvp = ToyBackbone.velocity_jvp

    def timed_jvp(self, *a, **kw):
        t = time.perf_counter()
        stats["in_jvp"] = True
        try:
            return orig_jvp(self, *a, **kw)
        finally:
            stats["in_jvp"] = False
            stats["net_s"] += time.perf_counter() - t
            stats["passes"]["jvp"] += 1

    orig_encode = ToyBackbone.encode_prompts

    def timed_encode(self, prompts):
        t = time.perf_counter()
        out = orig_encode(self, prompts)
        stats["net_s"] += time.perf_counter() - t
        stats["passes"]["text"] += 1
        return out

    orig_backward = accelerate.Accelerator.backward

    def timed_backward(self, loss, **kw):
        t = time.perf_counter()
        orig_backward(self, loss, **kw)
        stats["net_s"] += time.perf_counter() - t
        stats["passes"]["backward"] += 1

    rows = []
    for name in names:
        cls = METHODS.get(name)
        orig_init = cls.__init__

        def init(self, *a, _orig=orig_init, **kw):
            _orig(self, *a, **kw)
            current["method"] = self

        cls.__init__ = init
        ToyBackbone.velocity = timed_velocity
        ToyBackbone.velocity_jvp = timed_jvp
        ToyBackbone.encode_prompts = timed_encode
        accelerate.Accelerator.backward = timed_backward
        try:
            cfg = resolve_config(name, "toy", {"train.steps": str(args.iters), "train.batch_size": str(args.batch),
                                               "train.checkpoint_every": "100000", "train.log_every": "1000"})
            records = []
            orig_train_step = cls.train_step

            def train_step(self, batch, step, update, _o=orig_train_step):
                net0, passes0 = stats["net_s"], collections.Counter(stats["passes"])
                t = time.perf_counter()
                out = _o(self, batch, step, update)
                records.append((time.perf_counter() - t, stats["net_s"] - net0, stats["passes"] - passes0))
                return out

            cls.train_step = train_step
            with tempfile.TemporaryDirectory() as d:
                train(cfg, f"{d}/run", progress=False)
        finally:
            cls.__init__ = orig_init
            cls.train_step = orig_train_step
            ToyBackbone.velocity = orig_velocity
            ToyBackbone.velocity_jvp = orig_jvp
            ToyBackbone.encode_prompts = orig_encode
            accelerate.Accelerator.backward = orig_backward
        kept = records[4:]  # drop warm-up iterations (allocator, one-off pair/sample sets)
        n = len(kept)
        iter_s = sum(r[0] for r in kept) / n
        net_s = sum(r[1] for r in kept) / n
        per = collections.Counter()
        for r in kept:
            per.update(r[2])
        per = {k: v / n for k, v in per.items()}
        rows.append((name, iter_s * 1000, net_s * 1000, per, iter_s / net_s))
    print(f"toy backbone, batch {args.batch}, {args.iters} iterations, {args.threads} threads\n")
    print("| method | iteration ms | network passes ms | student / teacher (+CD's EMA target) / fake forwards per it | "
          "student JVPs per it | text-encoder passes per it | backwards per it | overhead ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name, it, net, per, ratio in rows:
        passes = f"{per.get('student', 0):.1f} / {per.get('teacher', 0) + per.get('other', 0):.1f} / {per.get('fake_score', 0):.1f}"
        print(f"| {name} | {it:.0f} | {net:.0f} | {passes} | {per.get('jvp', 0):.1f} | {per.get('text', 0):.1f} | "
              f"{per.get('backward', 0):.2f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
