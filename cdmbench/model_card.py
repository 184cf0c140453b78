"""The model card (README.md) of an exported student, written with huggingface_hub's ModelCard tooling.

Everything in it is rendered from the export record (``cdmbench.export``): the stock-diffusers call for each
step count is ``record["calls"][n]`` printed as Python, and the same calls sit in the card's YAML header under
``cdmbench.calls``, so a reader (or a test) can take them from either place and get the same numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CARD_FILE = "README.md"

# Jinja template (``ModelCard.from_template``); every value comes from ``_template_values``.
_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

A few-step text-to-image student of {{ base_link }}, distilled with **{{ method }}**{{ paper_text }} by
cdmbench {{ cdmbench_version }}. The folder is a stock diffusers `{{ pipeline_class }}`: running it needs
diffusers only, not cdmbench.

## Use it

The student runs **without classifier-free guidance** (`guidance_scale=1.0`: one transformer pass per step)
and **at the σ it was trained for** (`sigmas=`). The pipeline's defaults (guidance {{ default_guidance }}, its own
σ grid) run two transformer passes per step at other noise levels and give wrong images.

```python
{% if stochastic %}import torch
{% endif %}from diffusers import {{ pipeline_class }}

pipe = {{ load_call }}
{% for line in setup_lines %}{{ line }}
{% endfor %}prompt = "a photo of a cat"
{% if stochastic %}torch.manual_seed(0)  # the re-noising noise comes from torch's global generator
{% endif %}
```
{% for c in calls %}
### {{ c.steps }} step{{ "s" if c.steps != 1 else "" }}

```python
image = {{ c.code }}.images[0]
```
{% endfor %}
Supported step counts: {{ steps_text }}. {{ sampling_text }}

## How the call matches cdmbench's sampler

- `sigmas` are the noise levels the transformer sees, σ = 1 is pure noise: the nominal grid 1 − k/n
  ({{ nominal_text }}) with the base scheduler's {{ shift_text }} already applied. The exported
  `scheduler/scheduler_config.json` therefore has `shift: 1.0` and `use_dynamic_shifting: false`, so the
  pipeline passes these values through unchanged (diffusers' `set_timesteps(sigmas=...)` applies the
  scheduler's shift to given σ). Keep this scheduler: the base model's would shift them a second time.
- `guidance_scale=1.0`: the student was distilled to sample without CFG; any value above 1 adds an
  unconditional pass and changes the output.
{{ stochastic_text }}

## Training record

| | |
|---|---|
{% for k, v in training_rows %}| {{ k }} | {{ v }} |
{% endfor %}
{% if method_config %}<details><summary>Method configuration</summary>

```json
{{ method_config }}
```

</details>
{% endif %}
## Files

Stock diffusers pipeline folder ({{ weights_text }}). `cdmbench_student.json` is cdmbench's record of the
export: the nominal and effective σ per step count, the calls above, the run and checkpoint it came from.
`cdmbench.export.load_exported_pipeline(folder)` loads it with loader options taken from cdmbench's code,
never from the folder.

## Limitations

A research benchmark artifact: {{ limitation_text }} It inherits the base model's licence and
limitations (see its model card).
"""


def _fmt(value: Any) -> str:
    return repr(value)


def call_code(call: dict[str, Any]) -> str:
    """``pipe(prompt, k=v, ...)`` for one call's keyword arguments (Python literals, in the record's order)."""
    return "pipe(prompt, " + ", ".join(f"{k}={_fmt(v)}" for k, v in call.items()) + ")"


def _is_hub_id(model: str) -> bool:
    from cdmbench.backbones.diffusers import _looks_like_path

    return not _looks_like_path(model) and not Path(model).exists()


def _training_rows(record: dict) -> list[tuple[str, str]]:
    meta, tr = record.get("meta") or {}, record.get("training") or {}

    def fmt(v, unit=""):
        if v is None:
            return "not recorded"
        if isinstance(v, float):
            v = f"{v:.4g}"
        return f"{v}{unit}"

    rows = [("method", f"{meta.get('method', 'unknown')}"), ("backbone", f"{record['arch']} (`{record['base_model']}`)"),
            ("weights", f"{record['weights']}" + (f", LoRA rank {record['lora_rank']} alpha {record['lora_alpha']}"
                                                 if record.get("lora_rank") else "") + f", {record['dtype']}"),
            ("checkpoint", f"{meta.get('checkpoint', 'not recorded')} ({meta.get('weights', 'ema')} weights)"),
            ("iterations", fmt(tr.get("train_step")) + (f" of {tr['planned_steps']} planned" if tr.get("planned_steps") else "")
             + ("" if tr.get("finished") is None else (", finished" if tr["finished"] else ", unfinished run"))),
            ("training seed", fmt(tr.get("train_seed"))),
            ("global batch", fmt(tr.get("global_batch"))),
            ("mixed precision", fmt(tr.get("mixed_precision"))),
            ("training compute", fmt(tr.get("train_tflops"), " TFLOPs")),
            ("training time", fmt(tr.get("train_minutes"), " min")),
            ("teacher forward passes", fmt(tr.get("train_teacher_fwd"))),
            ("run", f"`{meta.get('run', 'not recorded')}`")]
    return rows


def _template_values(record: dict, source: str) -> dict[str, Any]:
    import json

    meta = record.get("meta") or {}
    calls = record["calls"]
    steps = sorted(int(n) for n in calls)
    sched = record["scheduler"]
    if sched.get("use_dynamic_shifting"):
        shift_text = f"resolution-dependent shift (μ = {sched.get('mu'):.4g} at {record['call_kwargs'].get('height')} px)"
    else:
        shift_text = f"shift {sched.get('shift')}"
    method = meta.get("method", "unknown method")
    load_kwargs = "".join(f", {k}={_fmt(v)}" for k, v in (record.get("from_pretrained_kwargs") or {}).items())
    setup = []
    if record.get("lora_weight_name"):
        setup.append(f"pipe.load_lora_weights({source!r}, weight_name={record['lora_weight_name']!r})")
    for name, value in (record.get("attributes") or {}).items():
        setup.append(f"pipe.{name} = {_fmt(value)}")
    stochastic = bool(record.get("stochastic_sampling"))
    if stochastic:
        sampling_text = "Sampling is **stochastic** (see below)."
        stochastic_text = (
            "- Stochastic sampling (the exported scheduler has `stochastic_sampling: true`): each step predicts "
            "x̂0 = x − σ·v and re-noises it to the next σ with fresh Gaussian noise, x' = (1 − σ')·x̂0 + σ'·z, the "
            f"DMD2 multi-step sampler that cdmbench evaluates {method} with; the last step returns x̂0. The update "
            "is the same formula in both, but the noise z is not drawn from the same place: the stock pipeline "
            "does not pass `generator=` to the scheduler step, so z comes from torch's global random generator "
            "(seed it with `torch.manual_seed`), while cdmbench draws z from each image's own generator after its "
            "initial noise. On the CPU, with one image per call, `torch.manual_seed(s); latents = torch.randn(...)` "
            "followed by the call with `latents=latents` reproduces exactly cdmbench's image whose generator seed is "
            "`s` (`cdmbench.seeding.sample_seed(prompt_id, seed)`); with batches of images or on a GPU the draws differ (same distribution, other numbers).")
    else:
        sampling_text = "Sampling is deterministic (Euler steps along the student's velocity)."
        stochastic_text = ("- Deterministic sampling (`stochastic_sampling: false`): Euler steps x' = x + (σ' − σ)·v, "
                           "the same update as cdmbench's sampler, so the same `latents=` give the same image.")
    weights = record["weights"]
    weights_text = {"full": "full transformer weights", "lora_merged": "LoRA merged into the transformer weights",
                    "lora": f"base transformer plus the LoRA file `{record.get('lora_weight_name')}`"}.get(weights, weights)
    base = record["base_model"]
    base_link = f"[{base}](https://huggingface.co/{base})" if _is_hub_id(base) else f"`{base}`"
    paper = meta.get("paper") or ""
    method_config = meta.get("method_config")
    unsupported = [n for n in (1, 2, 4) if n not in steps]
    limitation_text = (f"it was evaluated at {', '.join(map(str, steps))} step(s) only"
                       + (f" ({method} cannot sample with {', '.join(map(str, unsupported))})" if unsupported else "")
                       + "; other step counts or resolutions are untested.")
    return {
        "title": f"{method} student of {base}",
        "base_link": base_link, "method": method, "paper_text": f" ({paper})" if paper else "",
        "cdmbench_version": record.get("cdmbench_version", ""), "pipeline_class": record["pipeline_class"],
        "default_guidance": record.get("pipeline_default_guidance", "above 1"),
        "load_call": f"{record['pipeline_class']}.from_pretrained({source!r}{load_kwargs})",
        "setup_lines": setup,
        "calls": [{"steps": n, "code": call_code(calls[str(n)])} for n in steps],
        "steps_text": ", ".join(map(str, steps)),
        "stochastic": stochastic, "sampling_text": sampling_text, "stochastic_text": stochastic_text,
        "nominal_text": "; ".join(f"{n} step{'s' if n != 1 else ''} {record['schedules'][str(n)]['nominal']}" for n in steps),
        "shift_text": shift_text,
        "training_rows": _training_rows(record),
        "method_config": json.dumps(method_config, indent=2) if method_config else "",
        "weights_text": weights_text, "limitation_text": limitation_text,
    }


def build_model_card(record: dict, source: str):
    """A ``huggingface_hub.ModelCard`` for an export record; ``source`` is what ``from_pretrained`` is given
    in the card (the folder, or the hub repository it is pushed to)."""
    from huggingface_hub import ModelCard, ModelCardData

    meta = record.get("meta") or {}
    steps = sorted(int(n) for n in record["calls"])
    base = record["base_model"]
    data = ModelCardData(
        library_name="diffusers", pipeline_tag="text-to-image",
        base_model=base if _is_hub_id(base) else None,
        tags=["text-to-image", "diffusers", "few-step", "distillation", "cdmbench",
              *([meta["method"]] if meta.get("method") else [])],
        cdmbench={"method": meta.get("method"), "arch": record["arch"], "pipeline_class": record["pipeline_class"],
                  "steps": steps, "stochastic_sampling": bool(record.get("stochastic_sampling")),
                  "calls": {n: record["calls"][str(n)] for n in steps}},
    )
    return ModelCard.from_template(data, template_str=_TEMPLATE, **_template_values(record, source))


def write_model_card(folder: Path, record: dict, source: str) -> Path:
    """Write ``folder/README.md``; returns its path."""
    path = Path(folder) / CARD_FILE
    build_model_card(record, source).save(path)
    return path
