"""Export an nvit checkpoint for deployment and sharing.

    python -m tools.export OUT/pruned_checkpoint.pth --output-dir deploy --name nvit_base
    python -m tools.export OUT/pruned_checkpoint.pth --format hf --output-dir hub/nvit_b
    python -m tools.export OUT/pruned_checkpoint.pth --format onnx,onnx-int8,pt2 --output-dir d

writes, in the output directory (default: the checkpoint's own), what --format lists
(default onnx,safetensors):
  onnx          NAME.onnx: input "images" (B, C, H, W), output "logits" (B, classes), B
                dynamic; a distilled model exports its eval output, the mean of its two heads.
                --onnx-exporter torchscript (default) or dynamo (torch.onnx's dynamo exporter)
  onnx-int8     NAME.int8.onnx: ONNX Runtime's int8 quantization of NAME.onnx, dynamic, or
                static with --calibration-data-set/--calibration-data-path (N images)
  safetensors   NAME.safetensors (the dims as JSON in its metadata key "dims", so
                `models.build_model(..., checkpoint="NAME.safetensors")` rebuilds it) and
                NAME.dims.json (for --dims of the other scripts)
  pt2           NAME.pt2: a torch.export program (batch dynamic), for torch's AOT runtimes
  hf            config.json, model.safetensors and README.md (a model card): a timm / Hugging
                Face hub folder; after `import models`, timm.create_model('local-dir:DIR',
                pretrained=True) builds it. --push-to-hub ORG/NAME uploads it.

Every file is checked against PyTorch on a random batch of 2 before it is kept (ONNX and
pt2: max abs diff <= 1e-4; int8: the difference and top-1 agreement are printed; hf: timm's
rebuild gives the same logits); all files are written under temporary names and renamed only
after every check passed, so a failed run leaves no output behind. ONNX needs
`pip install -r requirements-export.txt`.
"""
from __future__ import annotations

if not __package__:  # run as a file, `python tools/NAME.py`: import from the root, as -m does
    import pathlib, sys  # noqa: E401
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

import hub_folder
from atomic import atomic_path, check_output_file
from errors import UserError
from flags import POSITIVE_INT, Parser, user_message
from pruning import runtimes

EXPORTER_OPSETS = (14, 20)  # SDPA needs opset 14; the TorchScript exporter stops at 20
TOLERANCE = 1e-4
CHECK_BATCH = 2
BUILD_NAME = "deit_base_distilled_patch16_224"  # frame comes from the checkpoint's dims
FORMATS = ("onnx", "onnx-int8", "safetensors", "pt2", "hf")
DEFAULT_FORMATS = "onnx,safetensors"


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser("Export an nvit checkpoint for deployment and sharing.")
    p.add_argument("checkpoint", metavar="CKPT",
                   help="an nvit checkpoint holding 'model' and 'dims' (pruned_checkpoint.pth, "
                        "a training checkpoint.pth, an exported .safetensors or hub folder), "
                        "or a published NViT model of the reference repository")
    p.add_argument("--format", default=DEFAULT_FORMATS,
                   help=f"comma-separated: {', '.join(FORMATS)} (default {DEFAULT_FORMATS})")
    p.add_argument("--output-dir", default=None,
                   help="where to write the files (default: the checkpoint's directory)")
    p.add_argument("--name", default=None, help="base name of the files (default: checkpoint stem)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=1,
                   help="batch size of the example input used for tracing (the axis stays dynamic)")
    p.add_argument("--opset", type=int, default=runtimes.OPSET,
                   help=f"ONNX opset ({EXPORTER_OPSETS[0]}-{EXPORTER_OPSETS[1]}, default {runtimes.OPSET})")
    p.add_argument("--onnx-exporter", default="torchscript", choices=["torchscript", "dynamo"],
                   help="torch.onnx's TorchScript exporter (default) or its dynamo exporter")
    p.add_argument("--calibration-data-set", default=None,
                   help="onnx-int8: static quantization calibrated on this data set's "
                        "validation images (as --data-set; default: dynamic quantization)")
    p.add_argument("--calibration-data-path", default="", help="its --data-path")
    p.add_argument("--calibration-images", type=POSITIVE_INT, default=64,
                   help="how many images calibrate static int8 (default 64)")
    p.add_argument("--license", default="other",
                   help="hf: the model card's license (default 'other': the license of the "
                        "model it was pruned from applies)")
    p.add_argument("--push-to-hub", default=None, metavar="ORG/NAME",
                   help="hf: upload the folder to this Hugging Face hub repo (needs a token)")
    p.add_argument("--force", action="store_true", help="replace existing output files")
    p.add_argument("--no-check", action="store_true",
                   help="skip the comparison of every exported file with PyTorch")
    return p


# ----------------------------------------------------------------------------- steps
def parse_formats(text: str) -> list[str]:
    formats = [f.strip().lower() for f in text.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise UserError(f"--format {text!r}: expected a comma-separated list of "
                        f"{', '.join(FORMATS)}")
    return list(dict.fromkeys(formats))


def load_model(checkpoint: str) -> tuple[torch.nn.Module, dict]:
    """Our checkpoint, hub folder or an NViT reference model -> (eval-mode ReViT, the
    checkpoint's other entries: args, original_dims, top-1, speed report, ...). A dims-less
    (timm/DeiT) file is refused."""
    import models
    from models.checkpoint import is_hub_folder
    from models.factory import is_our_architecture
    from models.nvit_reference import is_reference_layout

    if not Path(checkpoint).exists() and not checkpoint.startswith(("http://", "https://")):
        raise UserError(f"checkpoint not found: {checkpoint}")
    ckpt = models.read_checkpoint(checkpoint)
    if "dims" not in ckpt and "original_dims" in ckpt:
        raise UserError(f"{checkpoint} is nvit_prune's resumable pruning state (the gated dense "
                        f"model); export the pruned_checkpoint.pth beside it instead")
    state = ckpt.get("model")
    ours = "dims" in ckpt or (Path(checkpoint).is_dir() and is_hub_folder(checkpoint)
                              and is_our_architecture(ckpt["hub_config"]["architecture"]))
    if not ours and not (isinstance(state, dict) and is_reference_layout(state)):
        raise UserError(f"{checkpoint} holds no dims: export needs an nvit checkpoint "
                        f"(pruned_checkpoint.pth, a training checkpoint.pth, an exported "
                        f".safetensors or hub folder), not a raw timm/DeiT state dict")
    info = {k: v for k, v in ckpt.items() if k not in ("model", "model_ema", "optimizer")}
    del ckpt
    return models.build_model(BUILD_NAME, checkpoint=checkpoint).eval(), info


def output_files(output_dir: str | None, checkpoint: str, name: str, formats: list[str],
                 force: bool) -> dict[str, Path]:
    """The files to write, checked (new or --force, folder writable) before any work."""
    base = Path(checkpoint).resolve()
    out = Path(output_dir) if output_dir else (base if base.is_dir() else base.parent)
    files = {"onnx": {"onnx": out / f"{name}.onnx"},
             "onnx-int8": {"onnx-int8": out / f"{name}.int8.onnx"},
             "safetensors": {"safetensors": out / f"{name}.safetensors",
                             "dims": out / f"{name}.dims.json"},
             "pt2": {"pt2": out / f"{name}.pt2"},
             "hf": {"hf-" + f: out / f for f in (hub_folder.CONFIG, hub_folder.WEIGHTS,
                                                  hub_folder.CARD)}}
    final = {k: p for f in formats for k, p in files[f].items()}
    for path in final.values():
        check_output_file(path, "--output-dir", force)
    return final


def example_input(model, batch: int, seed: int | None = None) -> torch.Tensor:
    d = model.dims
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randn(batch, d.in_chans, d.img_size, d.img_size, generator=gen)


def export_pt2(model: torch.nn.Module, path: Path, batch_size: int) -> None:
    """A torch.export program of the eval model, the batch axis dynamic."""
    example = example_input(model, max(batch_size, 2))
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))


def calibration_images(model, data_set: str, data_path: str, n: int) -> list[torch.Tensor]:
    """N validation images of a data set, transformed as evaluation transforms them, in
    batches of 8."""
    from types import SimpleNamespace

    import datasets
    d = model.dims
    args = SimpleNamespace(data_set=data_set.upper(), data_path=data_path, input_size=d.img_size)
    dataset, _ = datasets.build_dataset(is_train=False, args=args)
    n = min(n, len(dataset))
    images = torch.stack([dataset[i][0] for i in range(n)])
    return list(images.split(8))


def save_safetensors(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt", "dims": json.dumps(model.dims.to_dict())})


def run_onnx(path: Path, x: torch.Tensor):
    """The ONNX file's output on x with onnxruntime (None when it is not installed)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])


def compare(what: str, got: torch.Tensor | None, expected: torch.Tensor, exact: bool = True) -> None:
    """An exported file's output against PyTorch's: within TOLERANCE (or, for int8, said)."""
    if got is None:
        print(f"note: onnxruntime is not installed; skipped the {what} check "
              f"(pip install -r requirements-export.txt)")
        return
    if tuple(got.shape) != tuple(expected.shape):
        raise UserError(f"{what} check failed: output shape {tuple(got.shape)}, PyTorch gives "
                        f"{tuple(expected.shape)}")
    diff = float((got - expected).abs().max())
    agree = float((got.argmax(-1) == expected.argmax(-1)).float().mean())
    print(f"{what} check: max abs diff vs PyTorch on a batch of {len(expected)}: {diff:.3g}"
          + ("" if exact else f", top-1 agreement {agree:.0%}"))
    if exact and not diff <= TOLERANCE:  # also catches NaN
        raise UserError(f"{what} check failed: max abs diff {diff:.3g} > {TOLERANCE:g} "
                        f"(nothing written; --no-check writes the files anyway)")


def export(checkpoint: str, output_dir: str | None = None, name: str | None = None,
           batch_size: int = 1, opset: int = runtimes.OPSET, check: bool = True,
           force: bool = False, formats: str = DEFAULT_FORMATS, exporter: str = "torchscript",
           calibration: tuple[str, str, int] | None = None, license: str = "other",
           push_to_hub: str | None = None) -> dict[str, Path]:
    """Write the --format files; returns their paths."""
    fmts = parse_formats(formats)
    if push_to_hub and "hf" not in fmts:
        raise UserError("--push-to-hub uploads the hub folder: add hf to --format")
    if calibration and "onnx-int8" not in fmts:
        raise UserError("--calibration-data-set calibrates onnx-int8: add it to --format")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if not EXPORTER_OPSETS[0] <= opset <= EXPORTER_OPSETS[1]:
        raise UserError(f"--opset {opset} is not supported: use {EXPORTER_OPSETS[0]} to "
                        f"{EXPORTER_OPSETS[1]} (scaled dot-product attention needs 14)")
    name = name if name is not None else Path(checkpoint).stem
    if not name or "/" in name or os.sep in name or name in (".", ".."):
        raise UserError(f"--name {name!r} must be a plain file name without directories")
    final = output_files(output_dir, checkpoint, name, fmts, force)
    out = next(iter(final.values())).parent
    model, info = load_model(checkpoint)
    images = (calibration_images(model, *calibration) if calibration else None)
    try:
        with contextlib.ExitStack() as stack:  # all files appear together, or none
            tmp = {k: stack.enter_context(atomic_path(p)) for k, p in final.items()}
            write_all(model, info, tmp, fmts, batch_size, opset, exporter, images, license,
                      check)
    except OSError as e:
        raise UserError(f"could not write to {out}: {e.strerror or e}") from None
    if push_to_hub:
        url = hub_folder.push(out, push_to_hub)
        print(f"uploaded {out} to {url}")
    return final


def write_all(model, info: dict, tmp: dict, fmts: list[str], batch_size: int, opset: int,
              exporter: str, calibration, license: str, check_files: bool) -> None:
    """Every format's files to their temporary paths, each checked if asked."""
    x = example_input(model, CHECK_BATCH, seed=0)
    with torch.no_grad():
        expected = model(x)
    scratch = Path(tempfile.mkdtemp(dir=next(iter(tmp.values())).parent))
    try:
        if "onnx" in fmts or "onnx-int8" in fmts:
            fp32 = tmp.get("onnx", scratch / "fp32.onnx")
            runtimes.export_onnx(model, fp32, example_input(model, batch_size), opset, exporter)
            if check_files and "onnx" in fmts:
                compare("ONNX", run_onnx(fp32, x), expected)
            if "onnx-int8" in fmts:
                runtimes.quantize_onnx(fp32, tmp["onnx-int8"], calibration)
                if check_files:
                    compare("ONNX int8", run_onnx(tmp["onnx-int8"], x), expected, exact=False)
        if "safetensors" in fmts:
            save_safetensors(model, tmp["safetensors"])
            tmp["dims"].write_text(json.dumps(model.dims.to_dict(), indent=1) + "\n")
        if "pt2" in fmts:
            export_pt2(model, tmp["pt2"], batch_size)
            if check_files:
                program = torch.export.load(str(tmp["pt2"]))
                with torch.no_grad():
                    compare("pt2", program.module()(x), expected)
        if "hf" in fmts:
            hub_folder.write_folder(model, info, scratch, license)
            for f in (hub_folder.CONFIG, hub_folder.WEIGHTS, hub_folder.CARD):
                shutil.move(str(scratch / f), str(tmp["hf-" + f]))
            if check_files:
                folder = scratch / "hub_check"
                folder.mkdir()
                for f in (hub_folder.CONFIG, hub_folder.WEIGHTS):
                    shutil.copyfile(tmp["hf-" + f], folder / f)
                diff = hub_folder.loaded_equal(folder, model, x)
                print(f"hub folder check: timm.create_model('local-dir:...') against the "
                      f"checkpoint, max abs logit diff {diff:.3g}")
                if not diff <= TOLERANCE:
                    raise UserError(f"hub folder check failed: timm's rebuild differs by {diff:.3g}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    # safetensors creates its files as 0600: give every file the mode the umask gives
    umask = os.umask(0)
    os.umask(umask)
    for path in tmp.values():
        if path.exists():
            os.chmod(path, 0o666 & ~umask)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    calibration = ((args.calibration_data_set, args.calibration_data_path, args.calibration_images)
                   if args.calibration_data_set else None)
    try:
        paths = export(args.checkpoint, args.output_dir, args.name, args.batch_size, args.opset,
                       check=not args.no_check, force=args.force, formats=args.format,
                       exporter=args.onnx_exporter, calibration=calibration,
                       license=args.license, push_to_hub=args.push_to_hub)
    except UserError as e:
        sys.stderr.write(f"error: {user_message(e)}\n")
        return 2
    for path in paths.values():
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
