"""A model as timm and the Hugging Face hub share models: a folder with config.json,
model.safetensors and a model card (README.md).

config.json is timm's (`timm.models.save_config_for_hf`): `architecture` is our registered
`revit` (`reswin` for a Swin), `model_args` holds the per-block dims, `pretrained_cfg` the input size and
preprocessing. Once `import models` has registered our architectures,
`timm.create_model('local-dir:FOLDER', pretrained=True)` (or `hf-hub:ORG/NAME` for a pushed
folder) builds the model with its weights; `models.build_model` and every script's checkpoint
flag read such a folder too (models/checkpoint.py). The model card says where the model
came from, how it was pruned, its per-block dims, its cost against the dense model's, its
top-1 and the speedups measured when it was made.
"""
from __future__ import annotations

from pathlib import Path

import torch

from errors import UserError

CONFIG, WEIGHTS, CARD = "config.json", "model.safetensors", "README.md"
DATASETS = {"IMNET": "imagenet-1k", "CIFAR": "cifar10", "CIFAR10": "cifar10",
            "CIFAR100": "cifar100", "INAT": "inat2018", "INAT19": "inat2019"}
# the flags of a pruning run that say how it pruned (the card's "how it was made")
METHOD_FLAGS = ("model", "data_set", "cost", "latency_target", "latency_regularization",
                "prune_per_iter", "interval_prune", "group_size", "prune_dict",
                "pruning_config", "kl_loss_coeff", "original_loss_coeff", "kl_tau",
                "student_eval", "qk_v_units", "emb_saliency", "token_scale", "runtime", "epochs",
                "batch_size", "lr", "seed")


def write_folder(model, info: dict, folder: Path, license: str = "other") -> None:
    """config.json, model.safetensors and README.md of `model` in `folder` (which must not
    exist or be empty); `info` is the checkpoint it came from (args, original_dims, top-1,
    speed report, ...; whatever it has)."""
    from safetensors.torch import save_file
    from models import architecture_of
    from timm.models._hub import save_config_for_hf  # timm exports no public name for it
    model = model.eval()
    save_config_for_hf(model, str(folder / CONFIG),
                       model_config={"pretrained_cfg": {"architecture": architecture_of(model.dims)}},
                       model_args={"dims": model.dims.to_dict()})
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
    (folder / CARD).write_text(model_card(model, info, license))


def model_card(model, info: dict, license: str = "other") -> str:
    """The README.md of a hub folder: YAML front matter (library_name timm, license, tags,
    datasets), then what the model is, how it was made, its dims, cost, top-1 and speed."""
    from models import architecture_of, dims_from_dict, model_class
    from models.flops import count_macs
    args = info.get("args") or {}
    dims = model.dims
    data = DATASETS.get(str(args.get("data_set", "")).upper())
    front = ["---", "library_name: timm", f"license: {license}", "tags:",
             "- image-classification", "- timm", "- vision-transformer",
             *(["- swin-transformer"] if hasattr(dims, "depths") else []), "- pruned", "- nvit"]
    if data:
        front += ["datasets:", f"- {data}"]
    origin = args.get("model", "a ViT")
    pruned = "original_dims" in info
    lines = front + ["---", "",
                     f"# {'Pruned ' if pruned else ''}{origin}",
                     "",
                     (f"`{origin}` pruned by NViT's global structural pruning (Hessian-aware "
                      f"saliency over embedding channels, heads, QK and V dims and MLP neurons, "
                      f"ranked globally), made with nvit. "
                      if pruned else f"A `{origin}`-style model with per-block dims, trained "
                      f"with nvit. ") + "Load it with timm after `import models` (nvit "
                     "registers its architectures with timm on import):",
                     "", "```python", f"import models  # nvit: registers '{architecture_of(dims)}' with timm",
                     "import timm", "model = timm.create_model('local-dir:PATH/TO/THIS/FOLDER', "
                     "pretrained=True)  # or 'hf-hub:ORG/NAME'", "```", ""]
    macs = count_macs(model)[0]
    params = sum(p.numel() for p in model.parameters())
    rows = [["params", f"{params:,}"], ["MACs per image", _macs(macs)]]
    if pruned:
        original = dims_from_dict(info["original_dims"])
        dense = model_class(original)(original)
        d_macs = count_macs(dense)[0]
        d_params = sum(p.numel() for p in dense.parameters())
        rows = [["params", f"{d_params:,}", f"{params:,}", f"{params / d_params:.3f}"],
                ["MACs per image", _macs(d_macs), _macs(macs),
                 f"{macs / d_macs:.3f}"]]
        if info.get("top1_dense") is not None or info.get("top1_pruned") is not None:
            rows.append(["top-1 (%) on " + str(args.get("data_set", "its data")),
                         _pct(info.get("top1_dense")), _pct(info.get("top1_pruned")), ""])
        lines += ["## Cost and accuracy", "", "| | dense | pruned | ratio |", "|---|---|---|---|"]
    else:
        lines += ["## Cost", "", "| | |", "|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    lines += ["## Per-block dims", ""] + _dims_lines(dims)
    if pruned:
        lines += ["## How it was made", "",
                  f"`nvit_prune.py` toward a {info.get('cost', args.get('cost', '?'))} ratio of "
                  f"{args.get('latency_target', '?')} (reached {info.get('cost_ratio', float('nan')):.4f}), "
                  f"with these flags:", "", "| flag | value |", "|---|---|"]
        lines += [f"| `--{k}` | `{args[k]}` |" for k in METHOD_FLAGS if k in args] + [""]
    speed = info.get("speed")
    if speed:
        lines += ["## Speed, measured when it was made", "",
                  f"Dense against pruned on {speed.get('device')} in "
                  f"{speed.get('runtime', 'torch')} ({speed.get('precision')}, batch "
                  f"{speed.get('batch_size')}, "
                  f"{speed.get('pairs')} interleaved pairs): measured speedup "
                  f"**{speed['speedup']:.2f}x** (p25-p75 {speed['speedup_p25']:.2f}-"
                  f"{speed['speedup_p75']:.2f}); the MACs promised {speed['macs_speedup']:.2f}x"
                  + (f", the latency table {speed['table_speedup']:.2f}x"
                     if "table_speedup" in speed else "") + ".", ""]
    table = info.get("latency_table")
    if table:
        keys = ("device", "device_name", "runtime", "batch_size", "dtype", "threads",
                "num_tokens", "token_scale", "timing", "torch", "date")
        lines += ["## Latency table the pruner ranked by", "",
                  "; ".join(f"{k} {table[k]}" for k in keys if table.get(k) is not None) + ".", ""]
    return "\n".join(lines)


def _dims_lines(dims) -> list[str]:
    """The card's dims section: the frame, then one row per block (a Swin's with its stage
    and that stage's embedding width)."""
    swin = hasattr(dims, "depths")
    frame = (f"{dims.img_size} px, patch {dims.patch_size}, {dims.num_classes} classes"
             f"{', distilled' if dims.distilled else ''}.")
    if not swin:
        return [f"Embedding width {dims.embed_dim}; {frame}", "",
                "| block | heads | QK per head | V per head | MLP |", "|---|---|---|---|---|"] + [
            f"| {i} | {dims.num_heads[i]} | {dims.qk_dim[i]} | {dims.v_dim[i]} | "
            f"{dims.mlp_dim[i]} |" for i in range(dims.depth)] + [""]
    return [f"Swin v{dims.version}, stages of {dims.depths} blocks; {frame}", "",
            "| stage | embedding | window | block | heads | QK per head | V per head | MLP |",
            "|---|---|---|---|---|---|---|---|"] + [
        f"| {s} | {dims.embed_dim[s]} | {dims.window(s)[0]} | {i} | {dims.num_heads[i]} | "
        f"{dims.qk_dim[i]} | {dims.v_dim[i]} | {dims.mlp_dim[i]} |"
        for s in range(dims.num_stages) for i in dims.stage_blocks(s)] + [""]


def _macs(n: float) -> str:
    return f"{n / 1e9:.3f} G" if n >= 1e9 else f"{n / 1e6:.2f} M"


def _pct(v) -> str:
    return "-" if v is None else f"{float(v):.2f}"


def push(folder: Path, repo_id: str, token: str | None = None) -> str:
    """Upload the folder to the hub repo `repo_id` (created if needed); its URL. Offline or
    without a token: one line, nothing sent."""
    from huggingface_hub import HfApi, get_token
    from models.hub import _offline_env
    if "/" not in repo_id.strip("/"):
        raise UserError(f"--push-to-hub {repo_id}: expected ORG/NAME")
    if _offline_env():
        raise UserError(f"--push-to-hub {repo_id}: HF_HUB_OFFLINE is set; unset it to upload")
    token = token or get_token()
    if not token:
        raise UserError(f"--push-to-hub {repo_id}: no Hugging Face token (huggingface-cli "
                        f"login, or HF_TOKEN)")
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                          commit_message="Add a pruned model (nvit)")
    except Exception as e:  # network or permission: said in one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"--push-to-hub {repo_id}: the upload failed ({first[:160]})") from None
    return str(url)


def loaded_equal(folder: Path, model, x: torch.Tensor) -> float:
    """Max abs logit difference between `model` and what timm builds from the folder."""
    import timm
    import models  # noqa: F401  (registers our architectures)
    rebuilt = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        return float((rebuilt(x) - model.eval()(x)).abs().max())

