"""Turn finished ``ndeconv train`` runs into shipped zoo weights: ``zoo/weights/<model>.<tag>/``.

For each run directory: evaluate its weights on the full test split in float32, then stored as float16 and
as bfloat16; keep the first half-precision form whose test top-1 moves by <= 0.05 points (else float32),
write the folder with ``ndeconv.zoo._pretrained.ship_weights`` (model.safetensors, config.json, SHA256SUMS) and add
the run's metrics.jsonl, curves.png, its settings (in config.json) and a model card (README.md with a
model-index block). The folder is what ``huggingface-cli upload`` would push unchanged. The card's top-1 is
the shipped file's, the number ``ndeconv eval <model>.<tag>`` reproduces.

    python reproduce/ship.py runs/paper_claim/resnet18-nd [more run dirs] [--force]

Register ``<model>.<tag>`` first in the model's ``default_cfgs`` (listed first, it becomes the default tag; the
script refuses an unregistered tag). A new default changes what ``timm.create_model(model, pretrained=True)``
loads, so afterwards run ``reproduce/zoo_table.py`` and the whole suite, slow tests included (``pytest -q``).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
from pathlib import Path

import torch

import ndeconv  # noqa: F401 - registers the zoo
from ndeconv.io import atomic_write, save_json_atomic
from ndeconv.runtime import cpu_model_name
from ndeconv.training.evaluate import evaluate_on_dataset
from ndeconv.training.loop import load_run_model, read_run_config
from ndeconv.zoo._pretrained import WEIGHTS_DIR
from ndeconv.zoo._shipping import ship_weights

MAX_TOP1_CHANGE = 0.05  # points of test top-1 a half-precision copy may lose or gain
QUICK_CHECK_IMAGES = 1000  # the card's second number: `ndeconv eval NAME.TAG --test-subset 1000`, a tenth of the time
TAGS = {"fashion_mnist": "fashion_mnist"}
FORM_SUFFIX = {"stem": "_stem"}  # the hybrid's weights get a tag of their own, which builds the hybrid
FORMS = {True: "network-deconvolution", False: "BatchNorm", "stem": "hybrid"}


def run_tag(train: dict) -> str:
    """The tag a run's weights ship as: its dataset's, with its epochs beyond one (``fashion_mnist_e20``: timm
    never changes what a tag names, so the one-epoch weights keep ``fashion_mnist``) and the hybrid's suffix."""
    epochs = f"_e{train['epochs']}" if train["epochs"] > 1 else ""
    return TAGS[train["dataset"]] + epochs + FORM_SUFFIX.get(train["deconv"], "")


def check_registered(name: str, tag: str) -> None:
    """Refuse to ship weights no registry entry loads: ``<name>.<tag>`` must be in the model file's default_cfgs
    (first, to be the default) and its tag's data in ``TAG_DATA``."""
    import timm

    from ndeconv.zoo._pretrained import TAG_DATA

    if tag not in TAG_DATA:
        raise SystemExit(f"{name}.{tag}: no data for tag {tag!r}; add it to TAG_DATA in zoo/_pretrained.py first")
    if f"{name}.{tag}" not in timm.list_pretrained(f"{name}.*"):
        raise SystemExit(f"{name}.{tag} is not registered; add it to default_cfgs in the model's zoo file first "
                         "(listed first, it becomes the default tag)")
DATASET_NAMES = {"fashion_mnist": "Fashion-MNIST"}


def _stored_as(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The model as it is after its floating tensors went through ``dtype`` and back (what a user loads)."""
    twin = copy.deepcopy(model)
    state = {k: v.to(dtype).to(v.dtype) if v.is_floating_point() else v for k, v in twin.state_dict().items()}
    twin.load_state_dict(state)
    return twin.eval()


def train_command(train: dict) -> str:
    """The ``ndeconv train`` command line that reproduces the run (every setting that shapes it)."""
    flags = [
        ("--arch", train["arch"]), ("--deconv", str(train["deconv"]).lower()), ("--dataset", train["dataset"]),
        ("--epochs", train["epochs"]), ("--seed", train["seed"]), ("--optimizer", train["optimizer"]),
        ("--lr", train["lr"]), ("--momentum", train["momentum"]), ("--lr-scheduler", train["lr_scheduler"]),
        ("--wd", train["wd"]), ("--batch-size", train["batch_size"]), ("--block", train["block"]),
        ("--block-fc", train["block_fc"] if train["block_fc"] is not None else (512 if train["deconv"] is True else 0)),
        ("--deconv-iter", train["deconv_iter"]), ("--eps", train["eps"]), ("--stride", train["stride"]),
    ]
    if train.get("amp"):
        flags.append(("--amp", train["amp"]))
    if train.get("fast", 1) > 1:
        flags.append(("--fast", train["fast"]))
    if train.get("channels_last"):
        flags.append(("--channels-last", "true"))
    if train.get("bf16_whitening"):
        flags.append(("--bf16-whitening", "true"))
    return "ndeconv train " + " ".join(f"{k} {v}" for k, v in flags)


def model_card(name: str, tag: str, config: dict, metrics: list[dict], storage: dict) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    train = config["train"]
    dataset = DATASET_NAMES.get(train["dataset"], train["dataset"])
    top1 = storage["test_top1"]
    seconds = sum(r["seconds"] for r in metrics)
    params = storage["params"]
    quick = storage["quick_check"]
    data = ModelCardData(
        model_name=f"{name}.{tag}", license="mit", library_name="timm", pipeline_tag="image-classification",
        tags=["image-classification", "timm", "network-deconvolution", "ndeconv"], datasets=[train["dataset"]],
        eval_results=[EvalResult(
            task_type="image-classification", dataset_type=train["dataset"], dataset_name=dataset,
            dataset_split="test", metric_type="accuracy", metric_name="top-1 accuracy", metric_value=round(top1, 2),
        )],
    )
    card = f"""---
{data.to_yaml()}
---

# {name}.{tag}

{config['pretrained_cfg'].get('description', '')} A {storage['form']} **{name.removesuffix('_deconv')}**
({params / 1e6:.2f}M parameters) in the CIFAR topology of the paper's Table 1, trained by
ndeconv on the {len(metrics)}-epoch protocol of
*Network Deconvolution* (Ye et al., ICLR 2020, [arXiv:1905.11926](https://arxiv.org/abs/1905.11926)).

| | |
|---|---|
| test top-1 ({dataset}, 10,000 images) | **{top1:.2f}%** (top-5 {storage['test_top5']:.2f}%) |
| quick check (first {quick['images']:,} test images) | {quick['test_top1']:.2f}% (`{quick['command']}`) |
| epochs | {len(metrics)} ({metrics[-1]['step']} steps of {train['batch_size']}) |
| weights | {storage['dtype']} ({storage['note']}) |
| training time | {seconds / 60:.1f} min wall on {storage['machine']}{storage['time_note']} |
| license | MIT (weights and code) |

## Use

```python
import timm, ndeconv  # importing ndeconv registers the zoo with timm
model = timm.create_model("{name}.{tag}", pretrained=True).eval()  # 3x32x32 input in [0, 1], 10 classes
gray = timm.create_model("{name}.{tag}", pretrained=True, in_chans=1).eval()  # the weights' own 1x32x32 stem
```

As timm's convention has it, the default model takes 3 channels (the gray stem adapted exactly: an RGB copy
of a gray image gives the gray image's output, in eval) and its pretrained_cfg says so; `in_chans=1` is the
stem the weights were trained with. timm's data config gives the training input: `crop_pct` 32/28 makes its
eval transform Resize(28) + CenterCrop(32), the same 2-pixel zero border. `class_map.txt` is timm's
`--class-map` for an image folder of the test set (folder-safe names in class-index order):
`validate.py DATA --model {name}.{tag} --pretrained --class-map class_map.txt`.

**Fine-tuning: pass `in_chans=1` and gray inputs.** The 3-channel adaptation is exact in eval only: in
training the copies' batch covariance is not the gray one (the adapted stem's output is 1/√3 of the gray
stem's), so fine-tuning the default model trains another stem than the one these weights learned.

Evaluate it: `ndeconv eval {name}.{tag}`. Fold the whitening into plain convs for deployment:
`ndeconv fold {name}.{tag} -o folded.safetensors`, or export ONNX: `ndeconv export {name}.{tag} -o model.onnx`.

## Training

```bash
{train_command(train)}
```

Inputs are the 28x28 images zero-padded to 32x32 and scaled to [0, 1] (the authors' ToTensor, no
normalisation, no augmentation). Per-epoch numbers are in `metrics.jsonl`, the training batches' loss every few steps in
`steps.jsonl` (where the run recorded it), curves in `curves.png`, every
setting, the library versions and the git commit in `config.json` (`train`, `run`).

## Citation

```bibtex
@inproceedings{{ye2020network,
  title={{Network Deconvolution}},
  author={{Ye, Chengxi and Evanusa, Matthew and He, Hua and Mitrokhin, Anton and Goldstein, Tom and
          Yorke, James A. and Fermuller, Cornelia and Aloimonos, Yiannis}},
  booktitle={{International Conference on Learning Representations}},
  year={{2020}}
}}
```
"""
    return card


def _threads(count: int) -> str:
    return f"{count} thread{'' if count == 1 else 's'}"


def machine() -> str:
    """This machine, where the shipped file is evaluated."""
    return f"{cpu_model_name()} CPU, {_threads(torch.get_num_threads())} (torch {torch.__version__.split('+')[0]})"


def training_machines(metrics: list[dict], torch_version: str) -> str:
    """Where a run's epochs trained, from the CPU and thread count each epoch's row records: one machine, or each
    machine with its epochs (a run resumed across machines); rows from before runs recorded it say so."""
    spans: list[list] = []  # [where, first epoch, last epoch]
    for row in metrics:
        where = (f"{row['cpu']} CPU, {_threads(row['threads'])}" if "cpu" in row else "a CPU not recorded")
        if spans and spans[-1][0] == where and spans[-1][2] == row["epoch"] - 1:
            spans[-1][2] = row["epoch"]
        else:
            spans.append([where, row["epoch"], row["epoch"]])
    version = f" (torch {torch_version.split('+')[0]})"
    if len(spans) == 1:
        return spans[0][0] + version
    return "; ".join(f"{where} (epoch {a})" if a == b else f"{where} (epochs {a}-{b})" for where, a, b in spans) \
        + version


def ship_run(run_dir: Path, root: Path = WEIGHTS_DIR, force: bool = False, time_note: str = "") -> Path:
    config = read_run_config(run_dir)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if not metrics or metrics[-1].get("partial") or metrics[-1]["epoch"] < config["train"]["epochs"]:
        raise SystemExit(f"{run_dir}: the run has not finished all its epochs; resume it first")
    dataset = config["train"]["dataset"]
    tag = run_tag(config["train"])
    check_registered(config["architecture"], tag)  # before the evaluations: a refusal costs nothing
    model = load_run_model(run_dir)
    reference = evaluate_on_dataset(model, dataset)
    chosen, result, note = torch.float32, reference, "half precision changed test top-1 by more than 0.05 points"
    trials = {}
    for dtype in (torch.float16, torch.bfloat16):
        trial = evaluate_on_dataset(_stored_as(model, dtype), dataset)
        trials[str(dtype).removeprefix("torch.")] = trial.top1
        if abs(trial.top1 - reference.top1) <= MAX_TOP1_CHANGE:
            chosen, result = dtype, trial
            note = f"float32 top-1 {reference.top1:.2f}%, {str(dtype).removeprefix('torch.')} {trial.top1:.2f}%"
            break
    quick = evaluate_on_dataset(_stored_as(model, chosen), dataset, subset=QUICK_CHECK_IMAGES)
    stored = model.to(chosen) if chosen != torch.float32 else model
    folder = ship_weights(stored, tag, root=root, force=force)
    hub_config = json.loads((folder / "config.json").read_text())
    trained_with = config.get("run", {}).get("versions", {}).get("torch", torch.__version__)
    storage = {
        "dtype": str(chosen).removeprefix("torch."), "note": note, "test_top1": result.top1,
        "test_top5": result.top5, "test_loss": result.loss, "test_top1_float32": reference.top1,
        "test_top1_by_dtype": trials, "max_top1_change": MAX_TOP1_CHANGE,
        "machine": training_machines(metrics, trained_with), "evaluated_on": machine(),
        "params": sum(p.numel() for p in model.parameters()),
        "form": FORMS[config["train"]["deconv"]],
        "time_note": f" ({time_note})" if time_note else "",
        "quick_check": {"images": quick.count, "test_top1": quick.top1,
                        "command": f"ndeconv eval {config['architecture']}.{tag} --test-subset {quick.count}"},
    }
    hub_config.update(train=config["train"], run=config["run"], weights=storage)
    save_json_atomic(hub_config, folder / "config.json")
    for name in ("metrics.jsonl", "steps.jsonl", "curves.png"):
        if name != "steps.jsonl" or (run_dir / name).is_file():  # runs before steps.jsonl existed lack it
            shutil.copyfile(run_dir / name, folder / name)
    card = model_card(config["architecture"], tag, hub_config, metrics, storage)
    atomic_write(folder / "README.md", lambda tmp: tmp.write_text(card))
    print(f"{folder}: test top-1 {result.top1:.2f}% as {storage['dtype']} ({note})")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run directories of ndeconv train")
    parser.add_argument("--root", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--force", action="store_true", help="replace weights already shipped")
    parser.add_argument("--time-note", default="", help="what the wall time includes (pauses, other load)")
    args = parser.parse_args(argv)
    for run in args.runs:
        ship_run(run, args.root, args.force, args.time_note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
