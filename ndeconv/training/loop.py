"""The training run: the reference's loop (SGD, cosine LR stepped every iteration, cross-entropy) made
resumable, data-parallel and self-describing.

A run directory holds ``config.json`` (settings, versions, git commit, and timm's Hub fields, so the folder
also loads as ``local-dir:RUN_DIR``), ``checkpoint.pt`` (see ``checkpoint.py``), ``model.safetensors`` (the
weights after the last finished epoch), ``metrics.jsonl``, ``curves.png`` and TensorBoard events when
tensorboard is installed. Under torchrun only rank 0 touches the directory. One run at a time: the run holds
``.lock`` (see ``lock.py``) from start to end.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import platform
import random
import shutil
import subprocess
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from ..datasets import ImageSource, eval_crop_pct, get_spec, load_split
from ..errors import NdeconvError, UsageError, error_summary, os_error_fix
from ..io import read_json, save_json_atomic, save_safetensors_atomic
from ..layers.deconvolve import deconvolve
from ..layers.fast_deconv import set_bf16_whitening, set_fast_mode
from ..layers.sync import sync_deconv
from ..runtime import cpu_model_name, keep_freed_memory, native_amp_dtype
from .checkpoint import TrainState, load_checkpoint, restore_checkpoint, save_checkpoint
from .config import RESUMABLE_OVERRIDES, TrainConfig, build_model, is_imagenet_topology, model_kwargs
from .data import Preprocess, batch_loader, default_crop_padding, epoch_batches
from .dist import DistContext, setup
from .evaluate import evaluate
from .interrupt import StopRequests
from .lock import RunDirLock
from .metrics import Progress, TensorBoard, plot_curves, topk_correct, write_metrics
from .run_files import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    check_new_run_dir,
    load_run_model,
    read_run_config,
    refuse_resume_clashes,
)

__all__ = ["TrainResult", "load_run_model", "read_run_config", "train"]

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
STEPS_FILE = "steps.jsonl"
DIVERGED_FILE = "diverged.json"  # written when the loss stops being finite: what happened, where, when
_RUN_FILES = (CONFIG_FILE, WEIGHTS_FILE, METRICS_FILE, STEPS_FILE, CURVES_FILE, DIVERGED_FILE, "checkpoint.pt")
T = TypeVar("T")


@dataclass
class TrainResult:
    """What ``train`` returns: the run directory (written by rank 0 only), this rank's model and the epochs."""

    run_dir: Path
    model: nn.Module
    history: list[dict[str, Any]]


def _resume_config(run_dir: Path, cfg: TrainConfig, given: frozenset[str]) -> TrainConfig:
    """The run's own settings; a flag given now that would change what the run computes is refused."""
    saved = TrainConfig.from_dict(read_run_config(run_dir)["train"]).to_dict()
    return TrainConfig.from_dict(refuse_resume_clashes(run_dir, saved, cfg.to_dict(), given, RESUMABLE_OVERRIDES))


def _with_initial_layout(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the ``deconvolve`` record of its --initial-checkpoint (the layout the weights need), read from
    the checkpoint's config.json; the checkpoint must be of the run's architecture."""
    if cfg.initial_checkpoint is None:
        return cfg
    from ..loading import load_model

    loaded = load_model(cfg.initial_checkpoint)
    arch = (getattr(loaded.model, "pretrained_cfg", None) or {}).get("architecture")
    if arch != cfg.model_name():
        raise UsageError(f"--initial-checkpoint {cfg.initial_checkpoint} holds a {arch} but --arch is "
                         f"{cfg.model_name()}; pass --arch {str(arch).removesuffix('_deconv')}")
    settings = getattr(loaded.model, "deconv_settings", None)
    if settings is not None and settings.deconv != cfg.deconv:
        form = str(settings.deconv).lower()
        raise UsageError(f"--initial-checkpoint {cfg.initial_checkpoint} is {cfg.model_name()} built with --deconv "
                         f"{form} (then converted, if its config.json says so) but this run has --deconv "
                         f"{str(cfg.deconv).lower()}; pass --deconv {form}")
    recipe = loaded.config.get("deconvolve")
    return dataclasses.replace(cfg, deconvolve=dict(recipe) if isinstance(recipe, dict) else None)


def _initial_weights(cfg: TrainConfig, model: nn.Module) -> None:
    """Load --initial-checkpoint into the freshly built model (strict: every tensor, same shapes)."""
    from ..loading import load_model

    state = load_model(cfg.initial_checkpoint).model.state_dict()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise UsageError(f"--initial-checkpoint {cfg.initial_checkpoint} does not fit the model these settings build "
                         f"({error_summary(err)}); pass the --deconv, --block and --block-fc it was made with") from err


def _check_new_run_dir(run_dir: Path, force: bool) -> None:
    check_new_run_dir(run_dir, force, _is_run_dir, "ndeconv train")


def _diverged(ctx: DistContext, run_dir: Path, cfg: TrainConfig, state: TrainState, epoch: int,
              optimizer: torch.optim.Optimizer, tick: float, loss: str) -> UsageError:
    """Record a divergence in the run directory and return the error that ends the run.

    A diverged run is a result too (the paper-claim table reports it): recorded, so scripts can tell it from an
    interrupted run (resuming would repeat the same steps); the last checkpoint stays as it was.
    """
    record = {"step": state.global_step + 1, "epoch": epoch + 1, "loss": loss,
              "lr": optimizer.param_groups[0]["lr"], "seconds": state.seconds + time.perf_counter() - tick}
    ctx.on_main(_space_checked(run_dir, lambda: save_json_atomic(record, run_dir / DIVERGED_FILE, finite=True)))
    return UsageError(f"the loss became {loss} at step {state.global_step + 1}; lower --lr (now {cfg.lr}) or "
                      f"check the data; recorded in {run_dir / DIVERGED_FILE}, the last checkpoint is in {run_dir}")


def _write_refusal(err: BaseException | None) -> OSError | None:
    """The file system's refusal behind a failed write (a full disk, a quota, a file-size limit, a permission),
    anywhere in its exception chain: torch.save and safetensors wrap the OSError or only quote it."""
    seen: set[int] = set()
    quoted = {errno.ENOSPC: [os.strerror(errno.ENOSPC), "os error 28"],
              errno.EDQUOT: [os.strerror(errno.EDQUOT), "os error 122"]}
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno is not None:
            return err
        for code, texts in quoted.items():
            if any(text in str(err) for text in texts):
                return OSError(code, os.strerror(code))
        err = err.__cause__ or err.__context__
    return None


def _space_checked(run_dir: Path, fn: Callable[[], T]) -> Callable[[], T]:
    """``fn`` (a write into the run directory) with a refusal of the file system (a full disk, a file-size limit,
    a permission) said in one line instead of torch's double traceback, with what to do and how to go on. Nothing
    is lost: every file is written atomically, so the previous checkpoint is still whole."""

    def run() -> T:
        try:
            return fn()
        except NdeconvError:
            raise
        except Exception as err:
            refusal = _write_refusal(err)
            if refusal is None:
                raise
            if (run_dir / "checkpoint.pt").is_file():
                then = f"continue with `ndeconv train --resume {run_dir}` (the last checkpoint is intact)"
            else:  # the disk filled before the first checkpoint: nothing to continue from
                then = "start the run again" + (" with --force" if (run_dir / CONFIG_FILE).is_file() else "")
            if refusal.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NdeconvError(f"no space left on {run_dir}: free some space there, then {then}") from err
            raise NdeconvError(f"cannot write into {run_dir}: {refusal.strerror or refusal}; "
                               f"{os_error_fix(refusal.errno)}, then {then}") from err

    return run


def _remove_orphaned_temps(run_dir: Path) -> None:
    """Delete the temporary files a killed run left mid-write (``.checkpoint.pt.XXXXXXXX.tmp``, as large as a
    checkpoint): those of this run's own files only, named as ndeconv.io.atomic_write names them. Safe only under
    the run directory's lock, which guarantees no other process is writing one."""
    for name in _RUN_FILES:
        for tmp in run_dir.glob(f".{name}.????????.tmp"):
            tmp.unlink(missing_ok=True)


def _eval_seconds_left(history: list[dict[str, Any]], epoch: int, total_steps: int, steps_per_epoch: int,
                       test_images: int, images_per_s: float) -> float:
    """The evaluations still to come in the ETA: one at each epoch end (and at a --max-steps stop), each as long
    as the run's last one, or, before any, a test image costing a third of a training image (no backward)."""
    evals_left = max(math.ceil(total_steps / max(steps_per_epoch, 1)) - epoch, 0)
    last = history[-1].get("eval_seconds") if history else None
    each = float(last) if isinstance(last, (int, float)) else test_images / (3 * max(images_per_s, 1e-9))
    return evals_left * each


def _is_run_dir(path: Path) -> bool:
    try:
        config = read_json(path / CONFIG_FILE)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("train"), dict)


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _versions() -> dict[str, str]:
    import numpy
    import timm

    from .._version import __version__

    return {"ndeconv": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


def _amp_dtype(amp: str | None, device: torch.device) -> torch.dtype | None:
    if amp is None:
        return None
    if amp == "fp16" and device.type != "cuda":
        raise UsageError("--amp fp16 needs a CUDA device; on CPU use --amp bf16")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def _optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "SGD":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd)
    if cfg.optimizer == "Adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.wd)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.wd)


def _scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Any:
    if cfg.lr_scheduler == "cosine":
        # Stepped after every iteration over the whole run, as the authors' train_net does.
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps_per_epoch * cfg.epochs, eta_min=0)
    # The reference's milestones (every milestone * epochs epochs; main_imagenet.py's StepLR: every
    # scheduler_step_size epochs, without end). It steps the scheduler at the start of each epoch, so its LR drops
    # one epoch early; stepping at epoch ends with milestones - 1 gives the same LRs.
    if cfg.lr_scheduler == "step":
        milestones = list(range(cfg.scheduler_step_size, cfg.epochs + 1, cfg.scheduler_step_size))
    else:
        first = max(int(cfg.milestone * cfg.epochs), 1)
        milestones = [first]
        while milestones[-1] + first < cfg.epochs:
            milestones.append(milestones[-1] + first)
    return torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=[max(m - 1, 0) for m in milestones], gamma=cfg.multistep_gamma)


def _hub_config(cfg: TrainConfig, model: nn.Module, name: str, num_classes: int, in_chans: int,
                labels: tuple[str, ...] | None, started: str) -> dict[str, Any]:
    """timm's Hub config.json fields plus the run's settings: ``timm.create_model('local-dir:RUN_DIR')`` works."""
    spec = get_spec(cfg.dataset)
    size = 32 if spec.kind == "cifar" else cfg.img_size
    crop_pct = eval_crop_pct(spec, size, is_imagenet_topology(name))
    pretrained_cfg = {k: v for k, v in dict(getattr(model, "pretrained_cfg", {}) or {}).items()
                      if v is not None and k not in ("file", "hf_hub_id", "url", "source", "state_dict")}
    pretrained_cfg.update(
        tag=cfg.dataset, num_classes=num_classes, input_size=[in_chans, size, size],
        mean=list(spec.mean), std=list(spec.std), crop_pct=crop_pct,
    )
    pretrained_cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in pretrained_cfg.items()}
    args = model_kwargs(cfg, num_classes, in_chans)
    config: dict[str, Any] = {
        "architecture": name,
        "num_classes": num_classes,
        "num_features": int(getattr(model, "num_features", 0)),
        "global_pool": "avg",
        "model_args": {k: v for k, v in args.items() if k not in ("num_classes",)},
        "pretrained_cfg": pretrained_cfg,
    }
    if labels:
        config["label_names"] = list(labels)
    config["train"] = cfg.to_dict()
    config["run"] = {"started": started, "versions": _versions(), "git_commit": _git_commit(),
                     "platform": platform.platform()}
    return config


class _Meter:
    """Sums over the training batches of the current epoch (this rank's since the last checkpoint)."""

    KEYS = ("loss_sum", "correct1", "correct5", "count")

    def __init__(self, sums: dict[str, float] | None = None):
        self.sums = {k: float((sums or {}).get(k, 0.0)) for k in self.KEYS}

    def update(self, loss: float, c1: int, c5: int, n: int) -> None:
        for key, value in zip(self.KEYS, (loss * n, c1, c5, n), strict=True):
            self.sums[key] += value

    def reduce(self, ctx: DistContext) -> dict[str, float]:
        return dict(zip(self.KEYS, ctx.all_reduce_sum([self.sums[k] for k in self.KEYS]), strict=True))

    @staticmethod
    def summary(sums: dict[str, float]) -> tuple[float, float, float]:
        n = max(sums["count"], 1.0)
        return sums["loss_sum"] / n, 100.0 * sums["correct1"] / n, 100.0 * sums["correct5"] / n


def train(
    cfg: TrainConfig,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    force: bool = False,
    given: frozenset[str] = frozenset(),
    stream: TextIO | None = None,
) -> TrainResult:
    """Train (or continue) one run; return its directory, this rank's model and the per-epoch metrics.

    ``given`` names the settings the user chose explicitly (checked against the run's own when resuming). The run
    holds its directory's lock throughout (another run into it is refused), and SIGINT/SIGTERM stop it with a
    checkpoint at the next step boundary (an ``Interrupted`` error naming the command that continues it)."""
    if resume is not None:
        if out is not None and Path(out) != Path(resume):
            raise UsageError("pass either --out (a new run) or --resume (an existing one), not both")
        run_dir = Path(resume)
        if not run_dir.is_dir():
            raise UsageError(f"--resume {run_dir}: no such directory")
        cfg = _resume_config(run_dir, cfg, given)
    else:
        cfg = _with_initial_layout(cfg.resolved())
        run_dir = Path(out) if out is not None else Path(cfg.default_run_dir())
    cfg.validate()
    if cfg.keep_freed_memory:
        keep_freed_memory()
    ctx = setup(cfg.device)
    lock = RunDirLock(run_dir)
    try:
        if resume is None:  # before the lock creates the folder: a refused run touches nothing
            ctx.on_main(lambda: _check_new_run_dir(run_dir, force))
        ctx.on_main(lock.acquire)  # rank 0 only: it alone writes the directory (and no rank waits on another)
        with StopRequests(announce=ctx.is_main) as stops:
            return _run(cfg, ctx, run_dir, resume is not None, force, stream, stops)
    finally:
        lock.release()
        ctx.close()


def _run(cfg: TrainConfig, ctx: DistContext, run_dir: Path, resuming: bool, force: bool,
         stream: TextIO | None, stops: StopRequests) -> TrainResult:
    """The run under its lock: set up, start or resume the run directory, then train epoch by epoch."""
    progress = Progress(ctx.is_main, cfg.log_every, stream)
    if not resuming:  # again, under the lock: another run may have written it since the first check
        ctx.on_main(lambda: _check_new_run_dir(run_dir, force))
    amp_dtype = _resolve_amp(cfg, ctx.device, resuming, progress)
    data = _load_data(cfg)
    parts = _build_training(cfg, ctx, data, amp_dtype, resuming)
    if resuming:
        state = _resume_from_checkpoint(run_dir, cfg, ctx, parts)
        if state.finished:
            stopped = " (stopped by --max-steps; train longer in a new run)" if (
                state.history and state.history[-1].get("partial")) else ""
            progress.log(f"{run_dir}: the run already finished ({state.global_step} steps){stopped}; nothing to do")
            return TrainResult(run_dir, parts.model, state.history)
        progress.log(f"resuming {run_dir} at epoch {state.epoch + 1}, step {state.global_step}")
    else:
        state = TrainState()
        hub = _hub_config(cfg, parts.model, parts.name, data.num_classes, data.in_chans, data.class_names,
                          time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        hub["run"]["world_size"] = ctx.world
        hub["run"]["device"] = str(ctx.device)
        ctx.on_main(_space_checked(run_dir, lambda: _create_run_dir(run_dir, hub)))
    trainer = _Trainer(cfg, ctx, run_dir, data, parts, state, amp_dtype, progress, stops)
    if not resuming:
        trainer.save()  # a run killed before its first --checkpoint-every still resumes (from step 0)
    return trainer.run()


# -- setup -----------------------------------------------------------------------------------------------------


def _resolve_amp(cfg: TrainConfig, device: torch.device, resuming: bool, progress: Progress) -> torch.dtype | None:
    """The autocast dtype of the run (None: float32), with ``--amp auto`` resolved into ``cfg`` (and said why)."""
    if cfg.amp == "auto":  # recorded resolved: a resumed run must not pick again on another machine
        native = native_amp_dtype(device)
        cfg.amp = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(native)
        if cfg.amp is None:
            progress.log(f"--amp: {device} has no native reduced-precision arithmetic (bf16 on CPU needs "
                         "AVX512-BF16 or AMX), where autocast is many times slower than float32: training in "
                         "float32 (pass --amp bf16 to force it)")
    elif cfg.amp == "bf16" and not resuming and native_amp_dtype(device) is None:
        progress.log(f"warning: --amp bf16 on {device}, which has no native bf16 arithmetic: expect steps "
                     "many times slower than float32 (same results as a bf16 machine up to rounding order)")
    return _amp_dtype(cfg.amp, device)


@dataclass
class _Data:
    """The images of a run: what it trains and evaluates on (after --train-subset/--test-subset) and how."""

    train: ImageSource
    test: ImageSource
    preprocess: Preprocess
    num_classes: int
    in_chans: int
    class_names: tuple[str, ...] | None


def _load_data(cfg: TrainConfig) -> _Data:
    spec = get_spec(cfg.dataset)
    # main_imagenet.py's augmentation for its topologies: RandomResizedCrop + flip as images decode (no padded
    # crop after), Resize + CenterCrop for evaluation; main.py's padded crop + flip for the rest.
    imagenet = is_imagenet_topology(cfg.model_name()) and spec.kind == "imagefolder"
    train_all = load_split(cfg.dataset, "train", cfg.data_dir, cfg.img_size, cfg.num_classes,
                           random_resized_crop=imagenet)
    num_classes = cfg.num_classes or spec.num_classes or len(train_all.class_names or ())
    test_all = load_split(cfg.dataset, "test", cfg.data_dir, cfg.img_size, num_classes,
                          crop_pct=eval_crop_pct(spec, cfg.img_size, imagenet))
    crop_padding = 0 if imagenet else default_crop_padding(spec, cfg.img_size)
    return _Data(train_all.subset(cfg.train_subset), test_all.subset(cfg.test_subset),
                 Preprocess(spec.mean, spec.std, crop_padding), num_classes, spec.in_chans, train_all.class_names)


@dataclass
class _Parts:
    """The model being trained and what steps it: built the same on every rank, before any checkpoint loads."""

    model: nn.Module
    name: str
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    steps_per_epoch: int
    layout: torch.memory_format


def _build_training(cfg: TrainConfig, ctx: DistContext, data: _Data, amp_dtype: torch.dtype | None,
                    resuming: bool = False) -> _Parts:
    # Same seed on every rank: identical initial weights (DDP also broadcasts rank 0's at wrap time).
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    import numpy as np

    np.random.seed(cfg.seed % 2**32)
    model = build_model(cfg, data.num_classes, data.in_chans)
    if cfg.deconvolve is not None:  # the layout of an --initial-checkpoint converted by ndeconv convert-bn
        model = deconvolve(model, **cfg.deconvolve)
    if cfg.initial_checkpoint is not None and not resuming:  # a resumed run has its own checkpoint
        _initial_weights(cfg, model)
    name = cfg.model_name()
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(ctx.device, memory_format=layout)
    if cfg.sync_deconv:
        sync_deconv(model)
    if cfg.fast > 1:
        set_fast_mode(model, cfg.fast)
    if cfg.bf16_whitening:
        set_bf16_whitening(model)
    optimizer = _optimizer(cfg, model)
    steps_per_epoch = len(epoch_batches(len(data.train), cfg.batch_size, cfg.seed, 0, ctx.rank, ctx.world))
    scheduler = _scheduler(cfg, optimizer, steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    return _Parts(model, name, optimizer, scheduler, scaler, steps_per_epoch, layout)


# -- run directory ---------------------------------------------------------------------------------------------


def _create_run_dir(run_dir: Path, hub: dict[str, Any]) -> None:
    """A new run's directory with its config.json (rank 0 only), nothing of an older run left in it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in _RUN_FILES:  # --force: nothing of an old run may mix into this one
        (run_dir / stale).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
    _remove_orphaned_temps(run_dir)
    save_json_atomic(hub, run_dir / CONFIG_FILE, finite=True)


def _resume_from_checkpoint(run_dir: Path, cfg: TrainConfig, ctx: DistContext, parts: _Parts) -> TrainState:
    """The state of a run continued from its checkpoint, restored into ``parts``; refused when the checkpoint does
    not belong to the run's config.json or the run started with another process count."""
    ctx.on_main(lambda: _remove_orphaned_temps(run_dir))
    payload = load_checkpoint(run_dir)
    # Through TrainConfig: a setting added after the run started takes its default on both sides.
    recorded = TrainConfig.from_dict(payload.get("config", {})).to_dict()
    saved = {k: v for k, v in recorded.items() if k not in RESUMABLE_OVERRIDES}
    now = {k: v for k, v in cfg.to_dict().items() if k not in RESUMABLE_OVERRIDES}
    if saved != now:
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        raise UsageError(f"--resume {run_dir}: checkpoint.pt was written with other settings than config.json "
                         f"({', '.join(diff)}); the run directory is mixed up")
    # Each rank's share of an epoch, the steps per epoch and the schedule's length all follow the process
    # count: a run continues only with the count it started with.
    started_with = (read_run_config(run_dir).get("run") or {}).get("world_size")
    if started_with is not None and int(started_with) != ctx.world:
        raise UsageError(f"--resume {run_dir}: the run started with {started_with} process(es), this is "
                         f"{ctx.world}; resume it with {started_with} (torchrun --nproc_per_node "
                         f"{started_with}) so its batches and schedule stay the same")
    return restore_checkpoint(payload, parts.model, parts.optimizer, parts.scheduler, parts.scaler)


def _write_run_state(run_dir: Path, parts: _Parts, cfg: TrainConfig, state: TrainState, final_epoch: bool) -> None:
    """Write the checkpoint (rank 0 only), after an epoch's end its weights, metrics and curves first."""
    if final_epoch:
        # The epoch's results before the checkpoint that says it is done: killed in between, the run
        # resumes from the previous checkpoint and writes them again, never "finished" without weights.
        (run_dir / DIVERGED_FILE).unlink(missing_ok=True)  # a resumed run that got past it after all
        save_safetensors_atomic(parts.model.state_dict(), run_dir / WEIGHTS_FILE, metadata={"format": "pt"})
        write_metrics(state.history, run_dir / METRICS_FILE)
        write_metrics(state.steps, run_dir / STEPS_FILE)
        form = "ND stem, BN" if cfg.deconv == "stem" else "ND" if cfg.deconv else "BN"
        plot_curves(state.history, run_dir / CURVES_FILE, f"{parts.name} ({form}) on {cfg.dataset}", steps=state.steps)
    save_checkpoint(run_dir, parts.model, parts.optimizer, parts.scheduler, parts.scaler, state, cfg.to_dict())
    _remove_orphaned_temps(run_dir)  # e.g. of a run killed mid-write and resumed


# -- training --------------------------------------------------------------------------------------------------


class _Trainer:
    """The epochs of one run: the training steps, checkpoints, and each epoch's evaluation and results."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext, run_dir: Path, data: _Data, parts: _Parts,
                 state: TrainState, amp_dtype: torch.dtype | None, progress: Progress, stops: StopRequests):
        self.cfg, self.ctx, self.run_dir, self.data, self.parts, self.state = cfg, ctx, run_dir, data, parts, state
        self.amp_dtype, self.progress, self.stops = amp_dtype, progress, stops
        model = parts.model
        self.net: nn.Module = model
        if ctx.distributed:
            self.net = nn.parallel.DistributedDataParallel(
                model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        self.board = TensorBoard(run_dir / "tensorboard", enabled=ctx.is_main)
        if ctx.is_main:
            params = sum(p.numel() for p in model.parameters())
            form = ("deconvolution stem + BatchNorm" if cfg.deconv == "stem"
                    else "deconvolution" if cfg.deconv else "BatchNorm")
            progress.log(f"{parts.name} ({form}, {params / 1e6:.2f}M parameters) on {cfg.dataset}: "
                         f"{len(data.train)} train / {len(data.test)} test images, {parts.steps_per_epoch} "
                         f"steps/epoch x {cfg.epochs} epochs, {ctx.world} process(es) on {ctx.device} -> {run_dir}")
        self.meter = _Meter(state.meter if ctx.is_main else None)
        self.window = _Meter(state.window)  # the steps since the last steps.jsonl row (resumed with the checkpoint)
        self.step_grid = max(1, parts.steps_per_epoch // cfg.curve_rows)  # fixed by the data and config: kept on resume
        planned = parts.steps_per_epoch * cfg.epochs
        self.total_steps = planned if cfg.max_steps is None else min(cfg.max_steps, planned)
        self.tick = time.perf_counter()  # when the training time counted in state.seconds last advanced

    def run(self) -> TrainResult:
        """The remaining epochs, each trained, evaluated and checkpointed; stopped by SIGINT/SIGTERM with a
        checkpoint (``Interrupted``), by a diverged loss, or by --max-steps."""
        state = self.state
        while state.epoch < self.cfg.epochs and not state.finished:
            epoch = state.epoch
            batches = epoch_batches(len(self.data.train), self.cfg.batch_size, self.cfg.seed, epoch, self.ctx.rank,
                                    self.ctx.world)
            stopped = self.train_epoch(epoch, batches)
            self.finish_epoch(epoch, stopped, len(batches))
            # Asked to stop during the evaluation: the epoch's checkpoint is the one to continue from.
            if not state.finished and self.stops.requested(self.ctx):
                self.board.close()
                raise self.stops.error(self.ctx, self.run_dir, state.global_step)
        self.board.close()
        self.progress.log(f"done: {self.run_dir / WEIGHTS_FILE}")
        return TrainResult(self.run_dir, self.parts.model, state.history)

    def save(self, final_epoch: bool = False) -> None:
        """A checkpoint (and, at an epoch's end, the epoch's results) in the run directory."""
        state, ctx = self.state, self.ctx
        # All ranks' sums go into rank 0's (the one that saves); the others start again from zero.
        state.meter = self.meter.reduce(ctx) if not final_epoch else {}
        state.window = dict(self.window.sums)
        self.meter.sums = _Meter(state.meter if ctx.is_main else None).sums
        ctx.on_main(_space_checked(self.run_dir,
                                   lambda: _write_run_state(self.run_dir, self.parts, self.cfg, state, final_epoch)))

    def train_epoch(self, epoch: int, batches: list[torch.Tensor]) -> bool:
        """The epoch's remaining training steps; True when --max-steps stopped it."""
        cfg, ctx, state = self.cfg, self.ctx, self.state
        self.net.train()
        self.tick = time.perf_counter()
        stop = False
        first = state.step_in_epoch
        seeds = [Preprocess.seed(cfg.seed, epoch, step, ctx.rank, "decode") for step in range(first, len(batches))]
        for step, (images, labels) in enumerate(
            batch_loader(self.data.train, batches[first:], cfg.num_workers, seeds), start=first
        ):
            x = self.data.preprocess(images, Preprocess.generator(cfg.seed, epoch, step, ctx.rank)).to(ctx.device)
            x = x.contiguous(memory_format=self.parts.layout)
            y = labels.to(ctx.device)
            loss, logits = self.train_step(x, y, epoch)
            self.count_step(loss, logits, y, epoch, step, len(batches))
            stop = cfg.max_steps is not None and state.global_step >= cfg.max_steps
            # SIGINT/SIGTERM: a checkpoint now, at a step boundary (at an epoch's last step, the epoch's own).
            interrupted = not stop and state.step_in_epoch < len(batches) and self.stops.requested(ctx)
            if (interrupted or cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0) and not stop \
                    and state.step_in_epoch < len(batches):
                self.save()
                if interrupted:
                    self.board.close()
                    raise self.stops.error(ctx, self.run_dir, state.global_step)
                self.progress.log(f"checkpoint at step {state.global_step}")
                self.tick = time.perf_counter()
            if stop:
                break
        return stop

    def train_step(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> tuple[float, torch.Tensor]:
        """One optimizer (and cosine LR) step on a batch: its loss and logits; a non-finite loss ends the run."""
        parts, optimizer = self.parts, self.parts.optimizer
        try:
            with torch.autocast(self.ctx.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext():
                logits = self.net(x)
            loss = F.cross_entropy(logits.float(), y)
        except FloatingPointError as err:
            # A deconvolution layer refuses a non-finite covariance (the weights diverged at the step before):
            # the same divergence, met before the loss.
            raise self.diverged(epoch, "non-finite") from err
        optimizer.zero_grad(set_to_none=True)
        if parts.scaler is not None:
            parts.scaler.scale(loss).backward()
            parts.scaler.step(optimizer)
            parts.scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if self.cfg.lr_scheduler == "cosine":
            parts.scheduler.step()
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise self.diverged(epoch, str(loss_value))
        return loss_value, logits

    def diverged(self, epoch: int, loss: str) -> UsageError:
        """The divergence recorded in the run directory (``_diverged``), as the error that ends the run."""
        return _diverged(self.ctx, self.run_dir, self.cfg, self.state, epoch, self.parts.optimizer, self.tick, loss)

    def count_step(self, loss: float, logits: torch.Tensor, y: torch.Tensor, epoch: int, step: int,
                   epoch_steps: int) -> None:
        """A finished step in the sums, the step counters, the within-epoch curve and the progress line."""
        state, ctx = self.state, self.ctx
        c1, c5 = topk_correct(logits.detach().float(), y)
        self.meter.update(loss, c1, c5, y.numel())
        self.window.update(loss, c1, c5, y.numel())
        state.step_in_epoch, state.global_step = step + 1, state.global_step + 1
        now = time.perf_counter()
        state.seconds += now - self.tick
        self.tick = now
        if ctx.is_main and state.global_step % self.step_grid == 0:
            w_loss, w_top1, _ = _Meter.summary(self.window.sums)
            state.steps.append({"step": state.global_step, "epoch": epoch + state.step_in_epoch / epoch_steps,
                                "lr": self.parts.optimizer.param_groups[0]["lr"], "train_loss": w_loss,
                                "train_top1": w_top1})
            self.board.scalar("train/step_loss", w_loss, state.global_step)
            self.window = _Meter()
        if ctx.is_main:
            cfg = self.cfg
            done = max(state.global_step, 1)
            rate = self.meter.sums["count"] * ctx.world / max(state.seconds, 1e-9)
            _, top1, _ = _Meter.summary(self.meter.sums)
            eta = (self.total_steps - done) * cfg.batch_size * ctx.world / max(rate, 1e-9)
            eta += _eval_seconds_left(state.history, epoch, self.total_steps, self.parts.steps_per_epoch,
                                      len(self.data.test), rate)
            self.progress.step(epoch + 1, cfg.epochs, step + 1, epoch_steps, state.global_step, loss, top1, rate,
                               eta)

    def finish_epoch(self, epoch: int, stopped: bool, epoch_steps: int) -> None:
        """Epoch end, or a --max-steps stop (``stopped``): evaluate, record the epoch's row, write its results and
        checkpoint, and log it."""
        cfg, ctx, state, model = self.cfg, self.ctx, self.state, self.parts.model
        # Every rank takes rank 0's whitening statistics, then all evaluate.
        ctx.broadcast_buffers(model)
        train_sums = self.meter.reduce(ctx)
        train_loss, train_top1, train_top5 = _Meter.summary(train_sums)
        self.progress.log(f"evaluating {len(self.data.test)} test images")
        eval_start = time.perf_counter()
        result = evaluate(model, self.data.test, self.data.preprocess, max(cfg.batch_size, 256), ctx.device,
                          self.amp_dtype, ctx, cfg.num_workers, self.parts.layout)
        row = {
            "epoch": epoch + 1, "step": state.global_step, "lr": self.parts.optimizer.param_groups[0]["lr"],
            "train_loss": train_loss, "train_top1": train_top1, "train_top5": train_top5,
            "test_loss": result.loss, "test_top1": result.top1, "test_top5": result.top5,
            "seconds": state.seconds, "images_per_s": train_sums["count"] / max(state.seconds, 1e-9),
            "eval_seconds": time.perf_counter() - eval_start,
            # Where this epoch trained: a run resumed across machines has epochs from several (its card names each).
            "cpu": cpu_model_name(), "threads": torch.get_num_threads(),
        }
        if stopped and state.step_in_epoch < epoch_steps:
            row["partial"] = True  # stopped by --max-steps inside the epoch
        if cfg.lr_scheduler in ("multistep", "step"):
            self.parts.scheduler.step()
        state.history.append(row)
        state.epoch, state.step_in_epoch, state.seconds = epoch + 1, 0, 0.0
        state.finished = stopped or state.epoch >= cfg.epochs
        self.save(final_epoch=True)
        if ctx.is_main:
            for key in ("train_loss", "train_top1", "test_loss", "test_top1", "lr", "images_per_s"):
                self.board.scalar(key.replace("_", "/", 1) if key != "lr" else key, row[key], epoch + 1)
        self.progress.log(f"epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss:.4f} top1 {train_top1:.2f}% | "
                          f"test loss {result.loss:.4f} top1 {result.top1:.2f}% top5 {result.top5:.2f}% | "
                          f"{row['seconds']:.1f}s, {row['images_per_s']:.0f} img/s")


