"""TF32 for float32 matmuls and convolutions on CUDA, through the API this torch has.

torch >= 2.9 has per-backend `fp32_precision` settings and deprecates the `allow_tf32` flags;
in torch 2.14 reading one family after the other was written raises ("mix of the legacy and
new APIs"). So nvit never touches `allow_tf32` where `fp32_precision` exists.
"""
import torch


def has_precision_api() -> bool:
    """torch >= 2.9: `torch.backends.*.fp32_precision`."""
    return hasattr(torch.backends, "fp32_precision")


def enable_tf32() -> None:
    """Allow TF32 in cuBLAS matmuls and cuDNN convolutions.

    Matmuls go through `set_float32_matmul_precision("high")`, which in torch >= 2.9 writes
    `cuda.matmul.fp32_precision = "tf32"` and the global precision together; the per-backend
    setter alone leaves the global one unreadable, and torch 2.14's inductor still reads it
    (autotune cache keys), so `--compile-mode max-autotune` would raise.
    """
    torch.set_float32_matmul_precision("high")
    if has_precision_api():
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        torch.backends.cudnn.allow_tf32 = True


def tf32_matmul_enabled() -> bool:
    """Whether float32 matmuls on CUDA may use TF32 now (a getter that never raises)."""
    if has_precision_api():
        return torch.backends.cuda.matmul.fp32_precision == "tf32"
    return torch.backends.cuda.matmul.allow_tf32


def tf32_conv_enabled() -> bool:
    """Whether float32 cuDNN convolutions may use TF32 now."""
    if has_precision_api():
        return torch.backends.cudnn.conv.fp32_precision == "tf32"
    return torch.backends.cudnn.allow_tf32
