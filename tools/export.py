"""Export an nvit checkpoint to ONNX and safetensors (with its dims) for deployment.

    python -m tools.export OUT/pruned_checkpoint.pth --output-dir deploy --name nvit_base

writes, in the output directory (default: the checkpoint's own):
  NAME.onnx          input "images" (B, C, H, W), output "logits" (B, classes), B dynamic;
                     a distilled model exports its eval output, the mean of its two heads
  NAME.safetensors   the state dict, with the dims as JSON in the metadata key "dims", so
                     `models.build_model(..., checkpoint="NAME.safetensors")` rebuilds it
  NAME.dims.json     the same dims as a file (for --dims of the other scripts)

Unless --no-check, the ONNX file is run with onnxruntime on a random batch of 2 and compared
with PyTorch (max abs diff <= 1e-4). All files are written to temporary names and renamed
only after the check passed, so a failed run leaves no output behind.
Needs `pip install -r requirements-export.txt` (onnx; onnxruntime for the check).
"""
from __future__ import annotations

if not __package__:  # run as a file, `python tools/NAME.py`: import from the root, as -m does
    import pathlib, sys  # noqa: E401
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse
import contextlib
import json
import os
import stat
import sys
import warnings
from pathlib import Path

import torch

from atomic import atomic_path, check_output_file
from errors import UserError
from flags import POSITIVE_INT, Parser, user_message

# The legacy TorchScript exporter (dynamo=False) is used: in this torch (2.14) it exports
# F.scaled_dot_product_attention with an explicit per-block `scale=` exactly (opset >= 14;
# checked against onnxruntime for non-default scales), turns the batch into a dynamic axis
# through `dynamic_axes`, needs only the `onnx` package and takes ~2 s for DeiT-base. The
# dynamo-based exporter gives the same numbers but needs onnxscript too and is 5-10x slower.
EXPORTER_OPSETS = (14, 20)  # SDPA needs opset 14; the TorchScript exporter stops at 20
DEFAULT_OPSET = 17  # first opset with a native LayerNormalization
TOLERANCE = 1e-4
CHECK_BATCH = 2
BUILD_NAME = "deit_base_distilled_patch16_224"  # frame comes from the checkpoint's dims


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser("Export an nvit checkpoint to ONNX and safetensors.")
    p.add_argument("checkpoint", metavar="CKPT",
                   help="an nvit checkpoint holding 'model' and 'dims' (pruned_checkpoint.pth, "
                        "a training checkpoint.pth or an exported .safetensors), or a published "
                        "NViT model of the reference repository")
    p.add_argument("--output-dir", default=None,
                   help="where to write the files (default: the checkpoint's directory)")
    p.add_argument("--name", default=None, help="base name of the files (default: checkpoint stem)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=1,
                   help="batch size of the example input used for tracing (the axis stays dynamic)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset ({EXPORTER_OPSETS[0]}-{EXPORTER_OPSETS[1]}, default {DEFAULT_OPSET})")
    p.add_argument("--force", action="store_true", help="replace existing output files")
    p.add_argument("--no-check", action="store_true",
                   help="skip the onnxruntime vs PyTorch comparison")
    return p


# ----------------------------------------------------------------------------- steps
def load_model(checkpoint: str) -> torch.nn.Module:
    """Our checkpoint or an NViT reference model -> eval-mode ReViT; a dims-less (timm/DeiT)
    file is refused."""
    import models
    from models.nvit_reference import is_reference_layout

    ckpt = models.read_checkpoint(checkpoint)
    if "dims" not in ckpt and "original_dims" in ckpt:
        raise UserError(f"{checkpoint} is nvit_prune's resumable pruning state (the gated dense "
                        f"model); export the pruned_checkpoint.pth beside it instead")
    state = ckpt.get("model")
    if "dims" not in ckpt and not (isinstance(state, dict) and is_reference_layout(state)):
        raise UserError(f"{checkpoint} holds no dims: export needs an nvit checkpoint "
                        f"(pruned_checkpoint.pth, a training checkpoint.pth or an exported "
                        f".safetensors), not a raw timm/DeiT state dict")
    del ckpt
    return models.build_model(BUILD_NAME, checkpoint=checkpoint).eval()


def output_files(output_dir: str | None, checkpoint: str, name: str, force: bool) -> dict[str, Path]:
    """The three files to write, checked (new or --force, folder writable) before any work."""
    out = Path(output_dir) if output_dir else Path(checkpoint).resolve().parent
    final = {"onnx": out / f"{name}.onnx", "safetensors": out / f"{name}.safetensors",
             "dims": out / f"{name}.dims.json"}
    for path in final.values():
        check_output_file(path, "--output-dir", force)
    return final


def export_onnx(model: torch.nn.Module, path: Path, batch_size: int, opset: int) -> None:
    try:
        import onnx  # noqa: F401  (the TorchScript exporter serialises through it)
    except ImportError:
        raise UserError("export needs the onnx package: pip install -r requirements-export.txt") from None
    d = model.dims
    example = torch.randn(batch_size, d.in_chans, d.img_size, d.img_size)
    with warnings.catch_warnings():
        # the legacy exporter's deprecation notice and timm's traced image-size assert
        # (the image size is fixed by the dims anyway) are noise here
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, opset_version=opset,
            input_names=["images"], output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=True)


def save_safetensors(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt", "dims": json.dumps(model.dims.to_dict())})


def check_onnx(model: torch.nn.Module, path: Path) -> float | None:
    """Max abs difference ONNX vs PyTorch on a random batch; None when onnxruntime is missing."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    d = model.dims
    x = torch.randn(CHECK_BATCH, d.in_chans, d.img_size, d.img_size,
                    generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"images": x.numpy()})[0]
    if got.shape != expected.shape:
        raise UserError(f"ONNX check failed: output shape {got.shape}, PyTorch gives {expected.shape}")
    return float(abs(got - expected).max())


def export(checkpoint: str, output_dir: str | None = None, name: str | None = None,
           batch_size: int = 1, opset: int = DEFAULT_OPSET, check: bool = True,
           force: bool = False) -> dict[str, Path]:
    """Write NAME.onnx, NAME.safetensors and NAME.dims.json; returns their paths."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if not EXPORTER_OPSETS[0] <= opset <= EXPORTER_OPSETS[1]:
        raise UserError(f"--opset {opset} is not supported: use {EXPORTER_OPSETS[0]} to "
                        f"{EXPORTER_OPSETS[1]} (scaled dot-product attention needs 14)")
    name = name if name is not None else Path(checkpoint).stem
    if not name or "/" in name or os.sep in name or name in (".", ".."):
        raise UserError(f"--name {name!r} must be a plain file name without directories")
    final = output_files(output_dir, checkpoint, name, force)
    out = final["onnx"].parent
    model = load_model(checkpoint)
    try:
        with contextlib.ExitStack() as stack:  # all three files appear together, or none
            tmp = {k: stack.enter_context(atomic_path(p)) for k, p in final.items()}
            write_all(model, tmp, batch_size, opset, check)
    except OSError as e:
        raise UserError(f"could not write to {out}: {e.strerror or e}") from None
    return final


def write_all(model, tmp: dict, batch_size: int, opset: int, check: bool) -> None:
    """ONNX, safetensors and dims to the temporary paths; the ONNX file checked if asked."""
    export_onnx(model, tmp["onnx"], batch_size, opset)
    save_safetensors(model, tmp["safetensors"])
    tmp["dims"].write_text(json.dumps(model.dims.to_dict(), indent=1) + "\n")
    # safetensors creates its file as 0600; give it the umask's mode like the others
    os.chmod(tmp["safetensors"], stat.S_IMODE(tmp["dims"].stat().st_mode))
    if check:
        diff = check_onnx(model, tmp["onnx"])
        if diff is None:
            print("note: onnxruntime is not installed; skipped the ONNX check "
                  "(pip install -r requirements-export.txt)")
        else:
            print(f"ONNX check: max abs diff vs PyTorch on a batch of {CHECK_BATCH}: {diff:.3g}")
            if not diff <= TOLERANCE:  # also catches NaN
                raise UserError(f"ONNX check failed: max abs diff {diff:.3g} > {TOLERANCE:g} "
                                f"(nothing written; --no-check writes the files anyway)")


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        paths = export(args.checkpoint, args.output_dir, args.name, args.batch_size, args.opset,
                       check=not args.no_check, force=args.force)
    except UserError as e:
        sys.stderr.write(f"error: {user_message(e)}\n")
        return 2
    for path in paths.values():
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
