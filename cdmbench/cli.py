"""The command line: a thin shell over library functions (style.md principle 12).

Examples:
    cdmbench train cdm --arch toy                    # distil with the toy default budget
    cdmbench train dmd2 --arch toy --set real_guidance=3 --steps-budget 200
    cdmbench train cdm --arch sd3 --dry-run          # print the resolved config and exit
    cdmbench eval --steps 1,2,4                      # every trained run + teacher rows
    cdmbench report                                  # markdown, plots and grid into reports/
"""

from __future__ import annotations

import enum
import functools
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
import typer.core

from cdmbench.errors import CdmbenchError


def _registry_enum(kind: str) -> type[enum.Enum]:
    """Typer choices built from a registry, so --help always matches what is registered."""
    if kind == "method":
        from cdmbench.methods import METHODS as reg
    elif kind == "backbone":
        from cdmbench.backbones import BACKBONES as reg
    else:
        from cdmbench.eval.metrics import METRICS as reg
    return enum.Enum(f"{kind.title()}Name", {n: n for n in reg.names()}, type=str)


def Flag(default: bool, *decls: str, help: str):  # noqa: A002 (typer's keyword)
    """A boolean option shown as a plain flag (or a --x/--no-x pair) in --help, without a ``<bool>`` metavar."""
    return typer.Option(default, *decls, help=help, metavar="")


_SCORERS = "Scorer weights and references"
MethodName = _registry_enum("method")
ArchName = _registry_enum("backbone")

class _OneLineErrors(typer.core.TyperGroup):
    """Usage errors (a bad option value, an unknown option or command) as one line, like every other error:
    ``error: <what is wrong> (see `cdmbench CMD --help`)``, exit code 2; no usage block or error panel."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        from typer._click import exceptions as cx  # typer vendors click; its exception classes live here

        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except cx.NoArgsIsHelpError as e:
            e.show()
            sys.exit(e.exit_code)
        except cx.UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else "cdmbench"
            typer.echo(f"error: {_one_line(e.format_message())} (see `{where} --help`)", err=True)
            sys.exit(e.exit_code)
        except cx.ClickException as e:
            typer.echo(f"error: {_one_line(e.format_message())}", err=True)
            sys.exit(e.exit_code)
        except typer.Abort:
            typer.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(cls=_OneLineErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="cdmbench: train few-step distilled students, evaluate them across step counts, report.")
toy_app = typer.Typer(no_args_is_help=True, help="Rebuild the embedded toy backbone's shipped weights.")
app.add_typer(toy_app, name="toy")


def friendly(fn):
    """Turn user-facing errors into one line on stderr and a non-zero exit (no traceback).

    ``CdmbenchError`` (bad input, missing weights, corrupt state, a failed guard) exits 2; an ``OSError``
    from the file system (a read-only folder, a file where a folder should be, a full disk) exits 1 with the
    file it concerns; Ctrl-C exits 130. Anything else is a bug and keeps its traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CdmbenchError as e:
            typer.echo(f"error: {_one_line(str(e))}", err=True)
            raise typer.Exit(2)
        except OSError as e:
            where = f": {e.filename}" if e.filename else ""
            typer.echo(f"error: {e.strerror or type(e).__name__}{where}", err=True)
            raise typer.Exit(1)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130)

    return wrapper


def _one_line(text: str) -> str:
    return " ".join(text.split()) if "\n" in text else text


def _backbone_options(model, device, dtype, lora_rank, allow_remote_code):
    from cdmbench.backbones.base import BackboneOptions

    return BackboneOptions(model=model, device=device, dtype=dtype, lora_rank=lora_rank,
                           allow_remote_code=allow_remote_code)


@app.command()
@friendly
def train(
    method: MethodName = typer.Argument(..., help="Distillation method (see `cdmbench methods`)."),
    arch: ArchName = typer.Option("toy", "--arch", help="Backbone (see `cdmbench arches`)."),
    set_: List[str] = typer.Option([], "--set", help="Override a setting: key=value (method field, train.<f>, backbone.<f>)."),
    steps_budget: Optional[int] = typer.Option(None, "--steps-budget", help="Training iterations (train.steps)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Prompts per iteration per process."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Training seed (train.seed)."),
    budget_tflops: Optional[float] = typer.Option(None, "--budget-tflops", help="Stop once the counted training compute reaches this many TFLOPs (train.budget_tflops)."),
    run_name: Optional[str] = typer.Option(None, "--run-name", help="Run folder name (default METHOD-ARCH)."),
    workspace: Path = typer.Option(Path("workspace"), "--workspace", help="Holds runs/ and eval/."),
    resume: bool = Flag(False, "--resume", help="Continue from the run's newest intact checkpoint."),
    force: bool = Flag(False, "--force", help="With --resume: accept changed step budget, logging/checkpoint cadence or device."),
    dry_run: bool = Flag(False, "--dry-run", help="Print the resolved config and exit."),
    model: Optional[str] = typer.Option(None, "--model", help="Hub id or local folder of the backbone weights."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N … (default: accelerate's device: the GPU when there is one, each process's own under accelerate launch)."),
    cpu: bool = Flag(False, "--cpu", help="Run on the CPU even where an accelerator is present."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16 for frozen parts."),
    lora_rank: int = typer.Option(0, "--lora-rank", help="0: full fine-tuning; >0: LoRA rank (peft)."),
    allow_remote_code: bool = Flag(False, "--allow-remote-code", help="Allow code from model repos."),
    log_with: str = typer.Option("tensorboard", "--log-with", help="Trackers besides the CSV health log, comma-separated: tensorboard, wandb, or none."),
    sample_images: int = typer.Option(4, "--sample-images", help="Prompts in the student sample grid logged at each checkpoint (0: none)."),
    quiet: bool = Flag(False, "--quiet", help="No progress bar."),
):
    """Distil a student with METHOD on a backbone; checkpoints land in WORKSPACE/runs/RUN.

    Device and precision follow accelerate: `accelerate launch --mixed_precision bf16 -m cdmbench.cli train …` trains
    in bf16 on each process's GPU; the backbone's precision (e.g. sd3: bf16) is the default otherwise.
    """
    from cdmbench.accel import select_device
    from cdmbench.config import parse_overrides
    from cdmbench.paths import check_name, check_writable_dir
    from cdmbench.run import resolve_config
    from cdmbench.train import check_trackers, train as run_train

    name = check_name(run_name, "--run-name") if run_name is not None else f"{method.value}-{arch.value}"
    device = select_device(device, cpu=cpu)
    trackers = check_trackers(_trackers(log_with))
    from cdmbench.paths import check_count

    check_count(sample_images, "--sample-images", minimum=0, maximum=64)
    if force and not resume:
        raise CdmbenchError("--force only applies with --resume")
    overrides = parse_overrides(set_)
    if steps_budget is not None:
        overrides["train.steps"] = str(steps_budget)
    if batch_size is not None:
        overrides["train.batch_size"] = str(batch_size)
    if seed is not None:
        overrides["train.seed"] = str(seed)
    if budget_tflops is not None:
        overrides["train.budget_tflops"] = str(budget_tflops)
    cfg = resolve_config(method.value, arch.value, overrides,
                         _backbone_options(model, device, dtype, lora_rank, allow_remote_code))
    if dry_run:
        typer.echo(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
        return
    check_writable_dir(workspace, "--workspace")
    check_writable_dir(workspace / "runs", "--workspace")
    final = run_train(cfg, workspace / "runs" / name, resume=resume, force=force, progress=not quiet,
                      log_with=trackers, sample_images=sample_images)
    typer.echo(f"trained {method.value} on {arch.value}: {final}")


@app.command("eval")
@friendly
def eval_(
    steps: str = typer.Option("1,2,4", "--steps", help="Student step counts, e.g. 1,2,4."),
    runs: Optional[str] = typer.Option(None, "--runs", help="Comma-separated run names (default: every trained run)."),
    metrics: Optional[str] = typer.Option(None, "--metrics", help="Comma-separated metrics (default: all registered)."),
    prompts: str = typer.Option("default", "--prompts", help="Prompt set name or file (txt / jsonl / csv)."),
    num_prompts: Optional[int] = typer.Option(None, "--num-prompts", help="Use the first N prompts."),
    seeds: str = typer.Option("0", "--seeds", help="Seeds per prompt, e.g. 0-3."),
    batch_size: int = typer.Option(16, "--batch-size", help="Generation batch size (does not change images)."),
    workspace: Path = typer.Option(Path("workspace"), "--workspace", help="Holds runs/ (the trained runs) and, by default, eval/."),
    out: Optional[Path] = typer.Option(None, "--out", help="Eval folder (default WORKSPACE/eval)."),
    teacher: bool = Flag(True, "--teacher/--no-teacher", help="Add teacher reference rows."),
    teacher_steps: Optional[str] = typer.Option(None, "--teacher-steps", help="Teacher step counts (default: --steps plus the backbone's own)."),
    arch: Optional[ArchName] = typer.Option(None, "--arch", help="Backbone for teacher/external rows when no run names it."),
    external: List[str] = typer.Option([], "--external", metavar="NAME=PATH_OR_ID", help="An already-distilled pipeline to evaluate beside the runs (repeatable)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N … for generation and scoring (default: accelerate's device: the GPU when there is one, each process's own under accelerate launch)."),
    cpu: bool = Flag(False, "--cpu", help="Run on the CPU even where an accelerator is present."),
    checkpoints: str = typer.Option("latest", "--checkpoints", help="latest | all (every kept checkpoint: a learning curve)."),
    allow_download: bool = Flag(False, "--allow-download", help="Let scorers download missing weights (default: local files only)."),
    quiet: bool = Flag(False, "--quiet", help="No progress bars or notes."),
    fid_reference: Optional[str] = typer.Option(None, "--fid-reference", rich_help_panel=_SCORERS, help="FID reference: a folder of images or an .npz with mu/sigma (default $CDMBENCH_FID_REF; a backbone's declared stats win)."),
    inception_weights: Optional[str] = typer.Option(None, "--inception-weights", rich_help_panel=_SCORERS, help="clean-fid's inception-2015-12-05.pt, file or folder (default $CDMBENCH_INCEPTION_PATH)."),
    clip_model: Optional[str] = typer.Option(None, "--clip-model", rich_help_panel=_SCORERS, help="open_clip architecture of the CLIP score (default $CDMBENCH_CLIP_MODEL, else ViT-L-14)."),
    clip_weights: Optional[str] = typer.Option(None, "--clip-weights", rich_help_panel=_SCORERS, help="open_clip pretrained tag or local checkpoint (default $CDMBENCH_CLIP_PRETRAINED, else openai)."),
    clip_prefix: str = typer.Option("", "--clip-prefix", rich_help_panel=_SCORERS, help="Text put before every prompt for the CLIP score (e.g. 'A photo depicts ')."),
    hps_weights: Optional[str] = typer.Option(None, "--hps-weights", rich_help_panel=_SCORERS, help="HPS v2.1 checkpoint HPS_v2.1_compressed.pt (default $CDMBENCH_HPS_PATH)."),
    hps_model: str = typer.Option("ViT-H-14", "--hps-model", rich_help_panel=_SCORERS, help="open_clip architecture the HPS checkpoint was trained from."),
    imagereward_weights: Optional[str] = typer.Option(None, "--imagereward-weights", rich_help_panel=_SCORERS, help="ImageReward.pt (default $CDMBENCH_IMAGEREWARD_PATH)."),
    imagereward_config: Optional[str] = typer.Option(None, "--imagereward-config", rich_help_panel=_SCORERS, help="ImageReward's med_config.json (default $CDMBENCH_IMAGEREWARD_MED_CONFIG)."),
    bert_tokenizer: Optional[str] = typer.Option(None, "--bert-tokenizer", rich_help_panel=_SCORERS, help="bert-base-uncased folder or vocab.txt for ImageReward (default $CDMBENCH_BERT_TOKENIZER_PATH)."),
    pickscore_model: Optional[str] = typer.Option(None, "--pickscore-model", rich_help_panel=_SCORERS, help="PickScore model, hub id or folder (default $CDMBENCH_PICKSCORE_MODEL)."),
    pickscore_processor: Optional[str] = typer.Option(None, "--pickscore-processor", rich_help_panel=_SCORERS, help="PickScore processor, hub id or folder (default $CDMBENCH_PICKSCORE_PROCESSOR)."),
    aesthetic_weights: Optional[str] = typer.Option(None, "--aesthetic-weights", rich_help_panel=_SCORERS, help="LAION aesthetic predictor aesthetic-model.pth (default $CDMBENCH_AESTHETIC_PATH)."),
    aesthetic_clip: Optional[str] = typer.Option(None, "--aesthetic-clip", rich_help_panel=_SCORERS, help="CLIP ViT-L/14 of the aesthetic predictor, folder or hub id (default $CDMBENCH_AESTHETIC_CLIP)."),
    lpips_net: str = typer.Option("alex", "--lpips-net", rich_help_panel=_SCORERS, help="LPIPS trunk: alex | squeeze | vgg."),
    lpips_weights: Optional[str] = typer.Option(None, "--lpips-weights", rich_help_panel=_SCORERS, help="torchvision weights of the LPIPS trunk, file or folder (default $CDMBENCH_LPIPS_TRUNK_PATH)."),
):
    """Generate (cached, resumable) and score every run × step count; rows go to results.csv."""
    from cdmbench.accel import select_device
    from cdmbench.eval.harness import EvalConfig, run_eval
    from cdmbench.eval.metrics.base import MetricOptions
    from cdmbench.paths import (MAX_BATCH, MAX_PROMPTS, MAX_SEEDS, MAX_STEPS, check_count, check_device,
                                check_name, check_readable_dir, check_writable_dir)
    from cdmbench.seeding import parse_int_list

    step_list = _step_list(steps, "steps")
    run_names = None
    if runs is not None:
        run_names = tuple(check_name(r.strip(), "--runs") for r in runs.split(",") if r.strip())
        if not run_names:
            raise CdmbenchError("--runs: empty list; pass run names separated by commas")
    for e in external:
        check_name(e.partition("=")[0].strip(), "--external NAME")
    check_count(num_prompts, "--num-prompts", maximum=MAX_PROMPTS)
    check_count(batch_size, "--batch-size", maximum=MAX_BATCH)
    if device is not None:
        check_device(device)
    if cpu:
        device = select_device(device, cpu=True)  # otherwise resolved by run_eval, per process under a launch
    scorers = MetricOptions(
        fid_reference=fid_reference, inception_path=inception_weights, clip_model=clip_model,
        clip_pretrained=clip_weights, clip_prefix=clip_prefix, hps_path=hps_weights, hps_model=hps_model,
        imagereward_path=imagereward_weights, imagereward_med_config=imagereward_config,
        bert_tokenizer_path=bert_tokenizer, pickscore_model=pickscore_model, pickscore_processor=pickscore_processor,
        aesthetic_path=aesthetic_weights, aesthetic_clip=aesthetic_clip, lpips_net=lpips_net,
        lpips_trunk_path=lpips_weights)
    check_readable_dir(workspace, "--workspace")
    check_writable_dir(out if out else workspace / "eval", "--out" if out else "--workspace")
    cfg = EvalConfig(
        workspace=str(workspace), steps=tuple(step_list), runs=run_names,
        metrics=tuple(m.strip() for m in metrics.split(",") if m.strip()) if metrics else None,
        prompts=prompts, num_prompts=num_prompts,
        seeds=tuple(parse_int_list(seeds, name="seeds", max_count=MAX_SEEDS)),
        batch_size=batch_size, out=str(out) if out else None, teacher=teacher,
        teacher_steps=tuple(_step_list(teacher_steps, "teacher-steps")) if teacher_steps else None,
        arch=arch.value if arch else None, external=tuple(external), device=device, progress=not quiet,
        checkpoints=checkpoints, metric_options=scorers,
    )
    if allow_download:
        import os

        from cdmbench.eval.metrics.base import DOWNLOAD_ENV

        os.environ[DOWNLOAD_ENV] = "1"  # read by the scorers' loaders (cdmbench.eval.metrics.base)
    path = run_eval(cfg)
    typer.echo(f"results: {path}")


def _trackers(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise CdmbenchError("--log-with: empty; pass tensorboard, wandb or none")
    if "none" in names:
        if len(names) > 1:
            raise CdmbenchError(f"--log-with: 'none' cannot be combined with {', '.join(n for n in names if n != 'none')}")
        return ()
    return names


def _step_list(text: str, name: str) -> list[int]:
    from cdmbench.paths import MAX_STEPS
    from cdmbench.seeding import parse_int_list

    values = parse_int_list(text, name=name, maximum=MAX_STEPS)
    if any(s < 1 for s in values):
        raise CdmbenchError(f"--{name}: step counts must be >= 1")
    return values


@app.command()
@friendly
def report(
    workspace: Path = typer.Option(Path("workspace"), "--workspace", help="Holds eval/results.csv (the default --results)."),
    results: Optional[Path] = typer.Option(None, "--results", help="Results file (default WORKSPACE/eval/results.csv)."),
    out: Path = typer.Option(Path("reports"), "--out", help="Report folder."),
    title: str = typer.Option("cdmbench report", "--title", help="Title of the report's markdown page."),
    grid: bool = Flag(True, "--grid/--no-grid", help="Draw the sample grid from the results folder's "
                              "image manifest (--no-grid: a results file without its images)."),
):
    """Write markdown tables, plots, an image grid and CSV pivots from the results, under a header (command,
    versions, date, n, prompt set, seeds, training seeds, global batch)."""
    from cdmbench.reports import build_report

    from cdmbench.paths import check_writable_dir

    res = results or workspace / "eval" / "results.csv"
    if not Path(res).is_file():
        raise CdmbenchError(f"no results at {res}; run `cdmbench eval` first")
    check_writable_dir(out, "--out")
    path = build_report(res, out, images_root=Path(res).parent if grid else None, title=title, argv=sys.argv)
    typer.echo(f"report: {path}")


@app.command()
@friendly
def export(
    run: str = typer.Argument(..., help="Run name in WORKSPACE/runs (or a run folder)."),
    out: Path = typer.Option(..., "--out", help="Output diffusers pipeline folder."),
    workspace: Path = typer.Option(Path("workspace"), "--workspace", help="Holds runs/ (where RUN is looked up)."),
    weights: str = typer.Option("ema", "--weights", help="ema | raw student weights."),
    lora: str = typer.Option("merge", "--lora", help="merge | lora (keep a LoRA file) for LoRA runs."),
    push_to_hub: Optional[str] = typer.Option(
        None, "--push-to-hub", metavar="REPO",
        help="Also upload the folder to this Hugging Face model repository (user/name); needs a hub connection."),
):
    """Export a trained student as a stock diffusers pipeline folder with a model card (README.md) that
    gives the exact call for each step count."""
    from cdmbench.export import export_run

    if weights not in ("ema", "raw"):
        raise CdmbenchError(f"--weights must be 'ema' or 'raw', got {weights!r}")
    if lora not in ("merge", "lora"):
        raise CdmbenchError(f"--lora must be 'merge' or 'lora', got {lora!r}")
    path = export_run(run, out, workspace=workspace, weights=weights, lora_mode=lora, push_to_hub=push_to_hub)
    typer.echo(f"exported: {path}" + (f" (pushed to {push_to_hub})" if push_to_hub else ""))


@app.command()
@friendly
def bench(
    arch: ArchName = typer.Option("toy", "--arch"),
    methods: Optional[str] = typer.Option(None, "--methods", help="Comma-separated (default: every method)."),
    steps: str = typer.Option("1,2,4", "--steps"),
    workspace: Path = typer.Option(Path("workspace"), "--workspace"),
    out: Path = typer.Option(Path("reports/toy"), "--out"),
    seeds: str = typer.Option("0-4", "--seeds", help="Eval seeds per prompt; the diversity metrics need >= 2 (default 5: 10 pairs per prompt)."),
    train_seeds: str = typer.Option("0", "--train-seeds", help="Training seeds: one run per method and seed, e.g. 0-2."),
    reference: Optional[str] = typer.Option(None, "--reference", help="Matched compute: every method trains to this method's default-budget compute (mean over its runs). Default: each method's own preset budget."),
    budget_tflops: Optional[float] = typer.Option(None, "--budget-tflops", help="Matched compute at this budget in counted training TFLOPs (instead of --reference)."),
    set_: List[str] = typer.Option([], "--set", help="Override a setting of every run: key=value (e.g. train.steps=40)."),
    num_prompts: Optional[int] = typer.Option(None, "--num-prompts", help="Evaluate the first N prompts."),
    curve_checkpoints: int = typer.Option(4, "--curve-checkpoints", help="Checkpoints kept per run; the first training seed's are all evaluated (learning-curve points)."),
    jobs: int = typer.Option(1, "--jobs", help="Worker processes for training runs and image generation (CPU: up to the core count; each gets cores/jobs threads)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
):
    """Train every method (finished runs are kept), evaluate it (the first training seed at every kept
    checkpoint: learning curves), and report means over training seeds with paired verdicts.

    Example: cdmbench bench --arch toy --train-seeds 0-2 --seeds 0-4 --reference cd
    """
    from cdmbench.bench import run_bench
    from cdmbench.config import parse_overrides
    from cdmbench.seeding import parse_int_list

    from cdmbench.paths import MAX_SEEDS, check_count, check_writable_dir

    names = [m.strip() for m in methods.split(",")] if methods else None
    if names is not None and not all(names):
        raise CdmbenchError("--methods: empty name in the list")
    step_list = _step_list(steps, "steps")
    seed_list = parse_int_list(seeds, name="seeds", max_count=MAX_SEEDS)
    check_count(jobs, "--jobs", maximum=64)
    check_writable_dir(workspace, "--workspace")
    check_writable_dir(out, "--out")
    path = run_bench(arch.value, names, step_list, workspace, out, seeds=seed_list, argv=sys.argv,
                     train_seeds=parse_int_list(train_seeds, name="train-seeds"),
                     reference=reference, budget_tflops=budget_tflops,
                     overrides=parse_overrides(set_), curve_checkpoints=curve_checkpoints, num_prompts=num_prompts,
                     progress=not quiet, jobs=jobs)
    typer.echo(f"report: {path}")


@app.command("methods")
@friendly
def list_methods():
    """List registered methods (built-in and plugged in through the cdmbench.methods entry points)."""
    from cdmbench.methods import METHODS

    for name, cls in METHODS.items():
        origin = "plugin" if METHODS.is_plugin(name) else "built-in"
        typer.echo(f"{name:8s} {origin:8s} {cls.paper}")


@app.command("arches")
@friendly
def list_arches():
    """List registered backbones."""
    from cdmbench.backbones import BACKBONES

    for name, cls in BACKBONES.items():
        typer.echo(f"{name:8s} {(cls.__doc__ or '').strip().splitlines()[0]}")


@app.command("metrics")
@friendly
def list_metrics():
    """List registered metrics with direction and protocol."""
    from cdmbench.eval.metrics import METRICS

    for name, cls in METRICS.items():
        arrow = "↑" if cls.higher_is_better else "↓"
        typer.echo(f"{name:12s} {arrow} {(cls.__doc__ or '').strip().splitlines()[0]}")


@toy_app.command("train-teacher")
@friendly
def toy_train_teacher(
    out: Path = typer.Option(..., "--out", help="Where to write the teacher safetensors."),
    vae: Optional[Path] = typer.Option(None, "--vae", help="The toy VAE file (`cdmbench toy train-vae`), required; embedded in the teacher file."),
    steps: int = typer.Option(8000, "--steps"),
    seed: int = typer.Option(0, "--seed"),
    lr: float = typer.Option(1e-3, "--lr"),
    init: Optional[Path] = typer.Option(None, "--init", help="Warm-start from this teacher file (tensors of matching shape)."),
    save_every: int = typer.Option(0, "--save-every", help="Also write --out every N steps (0: at the end only)."),
):
    """Reproduce the shipped toy teacher from a seed (see cdmbench/toy/train_teacher.py)."""
    import math

    from cdmbench.paths import MAX_INT, MAX_TRAIN_STEPS, check_count, check_writable_dir
    from cdmbench.toy.train_teacher import train_teacher

    check_count(steps, "--steps", minimum=0 if init is not None else 1, maximum=MAX_TRAIN_STEPS)  # 0: re-pack --init with --vae
    check_count(seed, "--seed", minimum=0, maximum=MAX_INT)
    if not (math.isfinite(lr) and lr > 0):
        raise CdmbenchError(f"--lr must be a positive number, got {lr}")
    if init is not None and not init.is_file():
        raise CdmbenchError(f"--init: no teacher file at {init}")
    if out.is_dir():
        raise CdmbenchError(f"--out {out} is a folder; pass the teacher's .safetensors file path")
    check_writable_dir(out.parent, "--out")
    if vae is None or not vae.is_file():
        raise CdmbenchError(f"--vae: {'required' if vae is None else f'no toy VAE file at {vae}'}; "
                            f"build one with `cdmbench toy train-vae`")

    typer.echo(json.dumps(train_teacher(out, vae, steps=steps, seed=seed, lr=lr, init=init, save_every=save_every),
                          indent=2, default=str))


@toy_app.command("train-vae")
@friendly
def toy_train_vae(
    out: Path = typer.Option(..., "--out", help="Where to write the VAE safetensors."),
    steps: int = typer.Option(2000, "--steps"),
    seed: int = typer.Option(0, "--seed"),
    latent_channels: int = typer.Option(8, "--latent-channels"),
    lr: float = typer.Option(2e-3, "--lr"),
    init: Optional[Path] = typer.Option(None, "--init", help="Continue from this VAE file."),
    decoder_only: bool = typer.Option(False, "--decoder-only", help="With --init: fine-tune the decoder only (the latent space stays)."),
):
    """Reproduce the toy VAE (the teacher's latent space) from a seed (see cdmbench/toy/vae.py)."""
    import math

    from cdmbench.paths import MAX_INT, MAX_TRAIN_STEPS, check_count, check_writable_dir
    from cdmbench.toy.vae import ToyVAEArch, train_vae

    check_count(steps, "--steps", maximum=MAX_TRAIN_STEPS)
    check_count(seed, "--seed", minimum=0, maximum=MAX_INT)
    check_count(latent_channels, "--latent-channels", maximum=64)
    if not (math.isfinite(lr) and lr > 0):
        raise CdmbenchError(f"--lr must be a positive number, got {lr}")
    if init is not None and not init.is_file():
        raise CdmbenchError(f"--init: no toy VAE file at {init}")
    if decoder_only and init is None:
        raise CdmbenchError("--decoder-only needs --init FILE (the VAE whose encoder is kept)")
    if out.is_dir():
        raise CdmbenchError(f"--out {out} is a folder; pass the VAE's .safetensors file path")
    check_writable_dir(out.parent, "--out")
    arch = ToyVAEArch(latent_channels=latent_channels)
    typer.echo(json.dumps(train_vae(out, steps=steps, seed=seed, lr=lr, arch=arch, init=init, decoder_only=decoder_only), indent=2))


@toy_app.command("train-evaluators")
@friendly
def toy_train_evaluators(
    out_dir: Path = typer.Option(..., "--out-dir", help="Folder for the evaluator weights and reference stats."),
    seed: int = typer.Option(0, "--seed"),
    only: Optional[str] = typer.Option(None, "--only", help="Comma-separated steps: classifier, clip, fid-reference, factors."),
):
    """Reproduce the shipped toy evaluators (classifier, tiny CLIP, FID reference statistics, free-factor regressor).

    Example: cdmbench toy train-evaluators --out-dir cdmbench/assets --only factors   (about a minute)
    """
    from cdmbench.paths import MAX_INT, check_count, check_writable_dir
    from cdmbench.toy.train_evaluators import train_all

    check_count(seed, "--seed", minimum=0, maximum=MAX_INT)
    check_writable_dir(out_dir, "--out-dir")
    steps = tuple(s.strip() for s in only.split(",") if s.strip()) if only is not None else None
    typer.echo(json.dumps(train_all(out_dir, seed=seed, only=steps), indent=2, default=str))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
