"""Export a distilled student as a standalone diffusers pipeline folder (cdm.md §8).

The folder is the base pipeline with the student transformer: full weights (a full fine-tune, or LoRA merged
with merge-and-unload), or the base transformer plus a LoRA file that ``pipe.load_lora_weights(folder)``
reads. It stands alone: the stock call for step count n,

    pipe(prompt, **record["calls"][str(n)])   # num_inference_steps, sigmas, guidance_scale=1.0, height, ...

is printed in the folder's model card (README.md, ``cdmbench.model_card``) and reproduces cdmbench's sampler:
``sigmas`` are the student's effective σ (the base scheduler's shift already applied), and the exported
scheduler config has ``shift: 1.0``, ``use_dynamic_shifting: false`` so diffusers' ``set_timesteps(sigmas=...)``
passes them through unchanged, and ``stochastic_sampling`` set to the method's sampler (DMD2's re-noising:
diffusers' stochastic step is the same update, x' = (1 − σ')·x̂0 + σ'·z, but the stock pipeline draws z from
torch's global generator, not from a per-image one; the card says so). ``cdmbench_student.json`` keeps the
nominal and effective σ lists, the calls and the run's facts. Unlike the CDM reference ``save.py``, loading is
strict, the exported weights must differ from the base, and the folder appears atomically (written to a
temporary sibling, then renamed).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch

from cdmbench.errors import CdmbenchError
from cdmbench.sampling import Schedule

logger = logging.getLogger(__name__)

STUDENT_FILE = "cdmbench_student.json"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
FORMAT_VERSION = 2  # 2: shift-1 scheduler, effective σ in the calls, model card
LoraMode = Literal["merge", "lora"]


def export_student(backbone, student_state: dict[str, torch.Tensor], out_dir: str | os.PathLike,
                   schedules: dict[int, Schedule], meta: dict[str, Any], lora_mode: LoraMode = "merge",
                   *, stochastic_sampling: bool = False, training: dict[str, Any] | None = None,
                   card_source: str | None = None, overwrite: bool = False) -> Path:
    """Write ``out_dir`` as a diffusers pipeline whose transformer is the student.

    Args:
        backbone: a diffusers backbone (``sd3``, ``longcat``) built with the student's options (LoRA rank, dtype).
        student_state: ``backbone.net_state_dict(student)`` of the weights to ship (the EMA, usually); LoRA
            backbones pass the adapter weights only. Loaded strictly.
        out_dir: the folder to create; it must not exist unless ``overwrite``.
        schedules: step count → the ``Schedule`` the student is evaluated with (``backbone.schedule(n)``).
        meta: JSON-serialisable run facts (run dir, step, EMA, method …), stored under ``"meta"``.
        lora_mode: "merge" writes full transformer weights (the only choice for full fine-tunes); "lora" keeps
            the base transformer and writes ``pytorch_lora_weights.safetensors`` for ``load_lora_weights``.
        stochastic_sampling: the student samples with x̂0 re-noising (``Method.stochastic_sampling``, DMD2);
            written into the exported scheduler config and the model card.
        training: the training record for the model card (``train_record`` columns, planned steps, ...).
        card_source: what the model card's ``from_pretrained(...)`` names (default: ``out_dir``; a hub repo id
            when the folder is pushed).
        overwrite: replace an existing ``out_dir`` (swapped in only after the new folder is complete).

    Returns:
        ``out_dir`` as a Path.
    """
    from cdmbench.backbones.diffusers import DiffusersBackbone

    if not isinstance(backbone, DiffusersBackbone):
        raise CdmbenchError(f"export writes diffusers pipelines; backbone {backbone.name!r} is not one "
                            f"(exportable: sd3, longcat)")
    if lora_mode not in ("merge", "lora"):
        raise CdmbenchError(f"lora_mode must be 'merge' or 'lora', got {lora_mode!r}")
    is_lora = backbone.options.lora_rank > 0
    if lora_mode == "lora" and not is_lora:
        raise CdmbenchError("lora_mode='lora' needs a LoRA student (lora_rank > 0); export full fine-tunes "
                            "with lora_mode='merge'")
    if lora_mode == "lora" and not hasattr(backbone.pipe, "load_lora_weights"):
        raise CdmbenchError(f"{type(backbone.pipe).__name__} cannot load LoRA files in this diffusers "
                            f"(no load_lora_weights); export with lora_mode='merge'")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise CdmbenchError(f"{out_dir} already exists; choose another folder or pass overwrite=True")
    if not isinstance(stochastic_sampling, bool):
        raise CdmbenchError(f"stochastic_sampling must be True or False, got {stochastic_sampling!r}")
    record = _student_record(backbone, schedules, meta, lora_mode, stochastic_sampling, training)

    net = backbone.load_net(student_state)  # strict: a key mismatch is an error
    if is_lora:
        _check_lora_changes_something(net, meta)
        if lora_mode == "merge":
            net.fuse_lora()
            net.unload_lora()
    if any(p.dtype != backbone.options.torch_dtype for p in net.parameters()):
        net = net.to(backbone.options.torch_dtype)  # ship in the teacher's dtype (fp32 masters → e.g. bf16)
    net.eval()
    if not is_lora or lora_mode == "merge":
        _check_full_differs(net, backbone.teacher, meta)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        from cdmbench.model_card import write_model_card

        pipe = backbone.pipe
        transformer = backbone.teacher if lora_mode == "lora" else net
        type(pipe)(**{**pipe.components, "transformer": transformer,
                      "scheduler": _exported_scheduler(pipe.scheduler, stochastic_sampling)}
                   ).save_pretrained(tmp, safe_serialization=True)
        if lora_mode == "lora":
            _save_lora(backbone, net, tmp)
        else:
            _verify_saved_transformer(net, tmp / "transformer")
        _verify_scheduler(backbone, tmp / "scheduler", schedules, record)
        (tmp / STUDENT_FILE).write_text(json.dumps(record, indent=2) + "\n")
        write_model_card(tmp, record, card_source if card_source is not None else str(out_dir))
        _make_readable(tmp)
        _swap_into_place(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    logger.info("exported %s student (%s) to %s", backbone.name, record["weights"], out_dir)
    return out_dir


# Pipeline attributes an export may record (data only: a name and its type); anything else is refused.
_DATA_ATTRIBUTES: dict[str, type] = {"tokenizer_max_length": int}


def load_exported_pipeline(path: str | os.PathLike, *, allow_remote_code: bool = False, **from_pretrained_kwargs):
    """(pipeline, record) for a folder written by ``export_student``. Call it as the model card says:
    ``pipe(prompt, **record["calls"][str(n)])``.

    The folder is data, never configuration of the loader: the pipeline class and its ``from_pretrained``
    options come from the registered backbone named by the record's ``arch`` (the record must agree with
    them), recorded attributes must be in ``_DATA_ATTRIBUTES`` with values of their type, the LoRA file name
    must be the one ``export_student`` writes, and repository code runs only with ``allow_remote_code``.
    ``from_pretrained_kwargs`` are the caller's own options (e.g. ``dtype``).
    """
    import diffusers

    from cdmbench.backbones import BACKBONES
    from cdmbench.backbones.diffusers import DiffusersBackbone
    from cdmbench.io import read_json

    path = Path(path)
    if not path.is_dir():
        raise CdmbenchError(f"exported pipeline folder {path} does not exist")
    record = read_json(path / STUDENT_FILE, what="export record", fix="is this a folder written by cdmbench export?")
    if not isinstance(record, dict):
        raise CdmbenchError(f"{path / STUDENT_FILE} is not a JSON object")
    arch = record.get("arch")
    if not isinstance(arch, str) or arch not in BACKBONES:
        raise CdmbenchError(f"{path / STUDENT_FILE}: arch {arch!r} is not a registered backbone "
                            f"({', '.join(BACKBONES.names())})")
    cls = BACKBONES.get(arch)
    if not (isinstance(cls, type) and issubclass(cls, DiffusersBackbone)):
        raise CdmbenchError(f"{path / STUDENT_FILE}: backbone {arch!r} does not export diffusers pipelines")
    if record.get("pipeline_class") != cls.pipeline_class:
        raise CdmbenchError(f"{path / STUDENT_FILE}: pipeline_class {record.get('pipeline_class')!r} is not the "
                            f"{arch} pipeline ({cls.pipeline_class})")
    recorded = record.get("from_pretrained_kwargs") or {}
    if recorded != cls.pipeline_load_kwargs:
        raise CdmbenchError(f"{path / STUDENT_FILE} asks for loader options {recorded!r}; cdmbench takes loader "
                            f"options from code, never from a folder (the {arch} ones are {cls.pipeline_load_kwargs!r})")
    attributes = record.get("attributes") or {}
    for name, value in (attributes.items() if isinstance(attributes, dict) else [("attributes", attributes)]):
        want = _DATA_ATTRIBUTES.get(name)
        if want is None or isinstance(value, bool) or not isinstance(value, want):
            raise CdmbenchError(f"{path / STUDENT_FILE}: attribute {name!r}={value!r} is not one an export sets "
                                f"(allowed: {', '.join(f'{k} ({t.__name__})' for k, t in _DATA_ATTRIBUTES.items())})")
    lora = record.get("lora_weight_name")
    if lora not in (None, LORA_WEIGHT_NAME):
        raise CdmbenchError(f"{path / STUDENT_FILE}: lora_weight_name {lora!r} is not {LORA_WEIGHT_NAME!r}")
    for k in ("trust_remote_code", "custom_pipeline"):
        if k in from_pretrained_kwargs:
            raise CdmbenchError(f"load_exported_pipeline: pass allow_remote_code=True instead of {k}")
    try:
        pipe = getattr(diffusers, cls.pipeline_class).from_pretrained(
            path, use_safetensors=True, trust_remote_code=allow_remote_code,
            **{**cls.pipeline_load_kwargs, **from_pretrained_kwargs})
    except (OSError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise CdmbenchError(f"could not load {path} as a {cls.pipeline_class} ({reason})") from None
    for name, value in attributes.items():
        setattr(pipe, name, value)
    if lora:
        pipe.load_lora_weights(path, weight_name=LORA_WEIGHT_NAME)
    return pipe, record


# ------------------------------------------------------------------------------------------------

def exact_float32(x: float) -> float:
    """The shortest decimal that is the same float32 as ``x`` (0.9000000000000001 → 0.9): σ values print
    readably in the card, and diffusers and cdmbench both turn them into the same float32."""
    import numpy as np

    value = float(np.format_float_positional(np.float32(x), unique=True, trim="0"))
    if np.float32(value) != np.float32(x):  # a numpy formatting change would break exactness: fail, not drift
        raise CdmbenchError(f"cannot print σ = {x!r} exactly as float32")
    return value


def stock_calls(backbone, schedules: dict[int, Schedule]) -> dict[str, dict[str, Any]]:
    """Step count → the keyword arguments of the stock pipeline call that runs cdmbench's sampler: the
    student's effective σ (as the exported shift-1 scheduler passes them through), no CFG, and the
    backbone's own call options (resolution, text length, ...)."""
    call_kwargs = backbone.inference_recipe()["call_kwargs"]
    return {str(n): {"num_inference_steps": n, "sigmas": [exact_float32(x) for x in s.effective],
                     "guidance_scale": 1.0, **call_kwargs}
            for n, s in sorted(schedules.items())}


def _call_default(pipe, name: str):
    """The default of a pipeline ``__call__`` argument (what a user gets without passing it), or None."""
    import inspect

    param = inspect.signature(type(pipe).__call__).parameters.get(name)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def _exported_scheduler(scheduler, stochastic_sampling: bool):
    """The base scheduler with the σ warp switched off (the calls give effective σ) and the method's sampler."""
    return type(scheduler).from_config({**scheduler.config, "shift": 1.0, "use_dynamic_shifting": False,
                                        "stochastic_sampling": stochastic_sampling})


def _student_record(backbone, schedules: dict[int, Schedule], meta: dict, lora_mode: str,
                    stochastic_sampling: bool, training: dict | None) -> dict:
    import cdmbench

    if not schedules:
        raise CdmbenchError("export needs at least one schedule (step count → Schedule)")
    for n, s in schedules.items():
        if not isinstance(n, int) or not isinstance(s, Schedule) or s.steps != n:
            raise CdmbenchError(f"schedules must map a step count n to a Schedule of n steps; got {n!r}: {s!r}")
        expected = backbone.shift_sigmas(list(s.nominal))
        if any(abs(a - b) > 1e-6 for a, b in zip(expected, s.effective)):
            raise CdmbenchError(f"the {n}-step schedule {s.as_dict()} was not made with this backbone's shift "
                                f"(expected effective σ {expected})")
    try:
        json.dumps(meta)
        json.dumps(training)
    except TypeError as e:
        raise CdmbenchError(f"export meta and training record must be JSON-serialisable: {e}") from e
    is_lora = backbone.options.lora_rank > 0
    cfg = backbone.pipe.scheduler.config
    recipe = backbone.inference_recipe()
    return {
        "format_version": FORMAT_VERSION,
        "cdmbench_version": cdmbench.__version__,
        "arch": backbone.name,
        "base_model": backbone.model_id,
        "pipeline_class": type(backbone.pipe).__name__,
        "weights": "full" if not is_lora else ("lora_merged" if lora_mode == "merge" else "lora"),
        "lora_rank": backbone.options.lora_rank,
        "lora_alpha": (backbone.options.lora_alpha or backbone.options.lora_rank) if is_lora else 0,
        "lora_weight_name": LORA_WEIGHT_NAME if lora_mode == "lora" else None,
        "dtype": backbone.options.dtype,
        # the base scheduler's σ warp (already in the calls' σ) and what the exported scheduler config says
        "scheduler": {"class": type(backbone.pipe.scheduler).__name__, "shift": cfg.get("shift"),
                      "use_dynamic_shifting": bool(cfg.get("use_dynamic_shifting")), "mu": backbone.shift_mu,
                      "exported": {"shift": 1.0, "use_dynamic_shifting": False,
                                   "stochastic_sampling": stochastic_sampling}},
        "guidance_scale": 1.0,
        "pipeline_default_guidance": _call_default(backbone.pipe, "guidance_scale"),
        "stochastic_sampling": stochastic_sampling,
        "schedules": {str(n): {"nominal": list(s.nominal), "effective": list(s.effective)}
                      for n, s in sorted(schedules.items())},
        "calls": stock_calls(backbone, schedules),
        **recipe,
        "usage": (f"pipe = diffusers.{type(backbone.pipe).__name__}.from_pretrained(DIR); "
                  "image = pipe(prompt, **record['calls'][str(n)]).images[0]  (README.md prints each call)"),
        "training": training,
        "meta": meta,
    }


def _lora_pairs(net):
    from peft.tuners.lora import LoraLayer

    for name, module in net.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.lora_A:
                yield name, module.lora_A[adapter].weight, module.lora_B[adapter].weight


def _unchanged_why(meta: dict) -> str:
    """Why a run's student may still equal its teacher, and what to do (for the refusal message)."""
    step, warmup = meta.get("step"), (meta.get("method_config") or {}).get("warmup")
    at = f"checkpoint {meta.get('checkpoint', '?')} after {step} training iterations"
    if isinstance(warmup, int) and isinstance(step, int) and warmup > 0 and step <= 2 * warmup:
        return (f"{at}, with the learning rate still warming up ({meta.get('method')}'s warmup={warmup}: it ramps "
                f"from 0 over the first {warmup} updates of each network, so a short run leaves the student "
                f"unchanged); train longer (--steps-budget, e.g. > {2 * warmup}) or with --set warmup=0 before exporting")
    return f"{at}; is this the run you meant, and did it train (see its metrics.csv)?"


def _check_lora_changes_something(net, meta: dict) -> None:
    if not any((b.float() @ a.float()).abs().max() > 0 for _, a, b in _lora_pairs(net)):
        raise CdmbenchError(f"not exporting: the LoRA student equals the base transformer (every B·A is zero): "
                            f"{_unchanged_why(meta)}")


def _check_full_differs(net, base, meta: dict) -> None:
    ours, theirs = net.state_dict(), base.state_dict()
    if set(ours) != set(theirs):
        raise CdmbenchError(f"the student transformer's keys differ from the base's "
                            f"(e.g. {sorted(set(ours) ^ set(theirs))[:3]})")
    if all(torch.equal(ours[k], theirs[k].to(ours[k])) for k in ours):
        raise CdmbenchError(f"not exporting: the student weights equal the base transformer's (the teacher): {_unchanged_why(meta)}")


def _verify_saved_transformer(net, folder: Path) -> None:
    reloaded = type(net).from_pretrained(folder, dtype=next(net.parameters()).dtype, use_safetensors=True)
    ours, saved = net.state_dict(), reloaded.state_dict()
    bad = sorted(set(ours) ^ set(saved)) or [k for k in ours if not torch.equal(ours[k].cpu(), saved[k].cpu())]
    if bad:
        raise CdmbenchError(f"the saved transformer does not reload to the student's weights (e.g. {bad[:3]})")


def _save_lora(backbone, net, folder: Path) -> None:
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    layers = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(net).items()}
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in net.peft_config["default"].to_dict().items()}
    type(backbone.pipe).save_lora_weights(folder, transformer_lora_layers=layers, weight_name=LORA_WEIGHT_NAME,
                                          transformer_lora_adapter_metadata=config)
    saved = load_file(str(folder / LORA_WEIGHT_NAME))
    prefix = f"{backbone.pipe.transformer_name}."
    if set(saved) != {prefix + k for k in layers} or any(not torch.equal(saved[prefix + k], v)
                                                         for k, v in layers.items()):
        raise CdmbenchError("the saved LoRA file does not hold the student's adapter weights")


def _verify_scheduler(backbone, folder: Path, schedules: dict[int, Schedule], record: dict) -> None:
    """The exported scheduler, handed each call's σ as the pipeline hands them (``set_timesteps(sigmas=...,
    mu=...)``), must run exactly the float32 σ cdmbench samples with, and sample as the method does."""
    sched = type(backbone.pipe.scheduler).from_pretrained(folder)
    if bool(sched.config.get("stochastic_sampling")) != record["stochastic_sampling"]:
        raise CdmbenchError(f"the exported scheduler's stochastic_sampling is {sched.config.get('stochastic_sampling')}"
                            f", not the method's {record['stochastic_sampling']}")
    for n, s in schedules.items():
        sched.set_timesteps(sigmas=record["calls"][str(n)]["sigmas"], mu=backbone.shift_mu)
        ran, want = sched.sigmas.cpu(), s.sigmas()
        if ran.shape != want.shape or not torch.equal(ran, want):
            raise CdmbenchError(f"the exported scheduler runs {ran.tolist()} for the {n}-step call, not cdmbench's "
                                f"σ {want.tolist()}")


def _make_readable(folder: Path) -> None:
    """mkdtemp/mkstemp create owner-only entries; give the export the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
    os.replace(out_dir, old / out_dir.name)
    os.replace(tmp, out_dir)
    shutil.rmtree(old)


def export_run(run: str | os.PathLike, out_dir: str | os.PathLike, *, workspace: str | os.PathLike = "workspace",
               weights: str = "ema", lora_mode: LoraMode = "merge", steps: tuple[int, ...] = (1, 2, 4),
               push_to_hub: str | None = None) -> Path:
    """Export a trained run (its latest checkpoint) with :func:`export_student`.

    Args:
        run: a run name under ``workspace/runs`` or a run folder.
        weights: "ema" (the student EMA, default) or "raw" (the optimised student weights).
        steps: step counts whose σ lists are recorded; those the method cannot sample are left out.
        push_to_hub: a Hugging Face repository id to upload the folder to after the export (never implied;
            checked before anything is written, and refused when the hub is offline).
    """
    from cdmbench.backbones import build_backbone
    from cdmbench.checkpoint import latest_checkpoint, load_checkpoint
    from cdmbench.eval.sources import train_record
    from cdmbench.methods import METHODS
    from cdmbench.paths import check_name, check_writable_dir
    from cdmbench.resume import read_run_config
    from cdmbench.run import RunDir

    if weights not in ("ema", "raw"):
        raise CdmbenchError(f"--weights must be 'ema' or 'raw', got {weights!r}")
    if push_to_hub is not None:
        check_hub_repo(push_to_hub)
    run_dir = Path(run) if Path(run).is_dir() else Path(workspace) / "runs" / check_name(str(run), "RUN")
    if not (run_dir / "config.json").is_file():
        raise CdmbenchError(f"no run {run!r}: {run_dir}/config.json not found")
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise CdmbenchError(f"run {run_dir} has no checkpoint yet")
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise CdmbenchError(f"--out {out_dir} already exists; choose another folder")
    check_writable_dir(out_dir, "--out")
    cfg = read_run_config(run_dir)
    backbone = build_backbone(cfg.arch, cfg.backbone)
    method_cls = METHODS.get(cfg.method)
    method = method_cls(backbone, cfg.method_config, training=False)
    nets, _, _, meta = load_checkpoint(ckpt)
    state = nets.get("student_ema" if weights == "ema" else "student")
    if state is None:
        raise CdmbenchError(f"checkpoint {ckpt} has no {'student_ema' if weights == 'ema' else 'student'} weights")
    supported = method.supported_steps
    schedules = {n: method.schedule(n) for n in steps if supported is None or n in supported}
    if not schedules:
        raise CdmbenchError(f"{cfg.method} samples only with {supported} steps; pass steps accordingly")
    rd = RunDir(run_dir)
    raw_config = rd.config_dict()
    training = {**dict(train_record(cfg, meta, raw_config.get("world_size", 1))),
                "planned_steps": cfg.train.steps, "finished": rd.finished,
                "mixed_precision": cfg.train.mixed_precision, "world_size": raw_config.get("world_size", 1)}
    info = {"run": str(run_dir), "method": cfg.method, "paper": method_cls.paper, "checkpoint": ckpt.name,
            "step": meta["step"], "weights": weights, "stochastic_sampling": bool(method.stochastic_sampling),
            "method_config": cfg.to_dict()["method_config"]}
    out = export_student(backbone, state, out_dir, schedules, info, lora_mode,
                         stochastic_sampling=bool(method.stochastic_sampling), training=training,
                         card_source=push_to_hub)
    if push_to_hub is not None:
        push_folder(out, push_to_hub)
    return out


# ------------------------------------------------------------------------------------------------
# Optional upload (``cdmbench export --push-to-hub REPO``); never run by the tests.

def check_hub_repo(repo: str) -> None:
    """Fail before any work when ``repo`` is not a repository id or the hub cannot be reached (offline)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise CdmbenchError(f"--push-to-hub {repo!r} is not a repository id like 'user/name' ({_first_line(e)})") from None
    if constants.HF_HUB_OFFLINE:
        raise CdmbenchError(f"--push-to-hub {repo}: the Hugging Face Hub is offline here (HF_HUB_OFFLINE=1); export "
                            f"without --push-to-hub and upload the folder later with `hf upload {repo} FOLDER`")


def push_folder(folder: Path, repo: str) -> None:
    """Create ``repo`` (a model repository) if needed and upload ``folder``; one line on failure."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo, repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model",
                          commit_message="cdmbench export")
    except Exception as e:  # network, auth, permissions: the export itself is done and stays
        raise CdmbenchError(f"exported to {folder}, but pushing it to {repo} failed ({type(e).__name__}: "
                            f"{_first_line(e)}); upload it later with `hf upload {repo} {folder}`") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
