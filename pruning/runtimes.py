"""Running a module the way it is deployed, to time it there: eager torch, torch.compile, ONNX
Runtime, or TensorRT (through ONNX Runtime's TensorRT execution provider).

`prepare(module, runtime, ...)` returns a callable image batch -> logits that runs the module
in that runtime. The ONNX runtimes export it with `export_onnx` (what tools/export.py
writes) and run it in an InferenceSession with torch's thread count (`session_options`);
`int8` quantizes the exported model with `quantize_onnx` (ONNX Runtime's dynamic int8:
weights int8, activations on the fly), or, in torch, with torch's dynamic int8 Linear (CPU).
Latency tables (pruning/latency.py) and speed reports time through it, so they time what is
deployed.
"""
from __future__ import annotations

import logging
import os
import tempfile
import warnings
from contextlib import nullcontext
from typing import Callable

import numpy as np
import torch
from torch import nn

from errors import UserError

RUNTIMES = ("torch", "torch-compile", "onnxruntime", "tensorrt")
ONNX_RUNTIMES = ("onnxruntime", "tensorrt")
OPSET = 17  # the first opset with a native LayerNormalization
DYNAMO_MIN_OPSET = 18  # the dynamo exporter's lowest implemented opset


def deploy_dtype(runtime: str, amp_dtype):
    """The autocast dtype `runtime` runs a model in when the run itself uses `amp_dtype`:
    ONNX Runtime runs the exported fp32 model (TensorRT builds fp16 engines under fp16)."""
    return None if runtime == "onnxruntime" else amp_dtype


def check_runtime(runtime: str, device: torch.device, amp_dtype, int8: bool = False) -> None:
    """Whether `runtime` can run here as asked; one line saying why not."""
    if runtime not in RUNTIMES:
        raise UserError(f"{runtime!r} is not one of {', '.join(RUNTIMES)}",
                        field="runtime")
    if runtime in ONNX_RUNTIMES:
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError(f"{runtime} needs onnxruntime (pip install -r "
                            f"requirements-export.txt)", field="runtime") from None
        if runtime == "tensorrt" and "TensorrtExecutionProvider" not in ort.get_available_providers():
            raise UserError("tensorrt needs ONNX Runtime's TensorRT execution provider "
                            "(onnxruntime-gpu built with TensorRT, on a CUDA GPU); the "
                            "onnxruntime here has none", field="runtime")
        if runtime == "onnxruntime" and amp_dtype is not None:
            raise UserError("onnxruntime runs the exported model in fp32 (or int8): "
                            "leave autocast off", field="runtime")
        if runtime == "onnxruntime" and device.type == "cuda" and \
                "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UserError("onnxruntime on CUDA needs onnxruntime-gpu (its CUDA "
                            "execution provider)", field="runtime")
    if int8 and (device.type != "cpu" or runtime not in ("torch", "onnxruntime")):
        raise UserError("int8 runs on the CPU in torch or onnxruntime", field="runtime")
    if int8 and amp_dtype is not None:
        raise UserError("int8 runs without autocast: leave it off", field="runtime")
    if int8 and runtime == "torch" and torch.backends.quantized.engine == "none":
        raise UserError("int8 in torch needs a quantized CPU engine, which this torch "
                        "build lacks; use onnxruntime", field="runtime")


def prepare(module: nn.Module, runtime: str, device: torch.device, amp_dtype=None,
            example: torch.Tensor | None = None, int8: bool = False
            ) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable that runs the eval `module` in `runtime` (see the module docstring)."""
    check_runtime(runtime, device, amp_dtype, int8)
    module = module.to(device).eval()
    if runtime in ("torch", "torch-compile"):
        if int8:
            module = int8_torch(module)
        if runtime == "torch-compile":
            module = torch.compile(module)
        def run(x: torch.Tensor) -> torch.Tensor:
            autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                        else nullcontext())
            with torch.inference_mode(), autocast:
                return module(x)
        return run
    return _onnx_session(module, runtime, device, amp_dtype, example, int8)


class Deployed(nn.Module):
    """A prepared runner as an eval module (what engine.evaluate scores)."""

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.run = run

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)


def int8_torch(module: nn.Module) -> nn.Module:
    """torch's dynamic int8 on the CPU: every Linear's weights int8, activations quantized on
    the fly (the attention products and norms stay fp32)."""
    from torch.ao.quantization import quantize_dynamic
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.14 deprecates the quantized tensor API
        return quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8)


# The TorchScript exporter (dynamo=False) is the default: in this torch (2.14) it exports
# F.scaled_dot_product_attention with an explicit per-block `scale=` exactly (opset >= 14;
# checked against onnxruntime for non-default scales), turns the batch into a dynamic axis
# through `dynamic_axes`, needs only the `onnx` package and takes ~2 s for DeiT-base. The
# dynamo exporter (--onnx-exporter dynamo) gives the same numbers, needs onnxscript too and
# is 5-10x slower.
def export_onnx(module: nn.Module, path, example: torch.Tensor, opset: int = OPSET,
                exporter: str = "torchscript") -> None:
    """The eval module as an ONNX file at `path`: input "images", output "logits", the batch
    axis dynamic. `exporter`: torch.onnx's TorchScript exporter or its dynamo exporter (which
    starts at opset 18)."""
    try:
        import onnx  # noqa: F401  (both exporters serialise through it)
    except ImportError:
        raise UserError("ONNX export needs the onnx package: pip install -r "
                        "requirements-export.txt") from None
    module, example = module.cpu().eval(), example.cpu()
    with warnings.catch_warnings():
        # the exporters' notices and timm's traced image-size assert (the image size is fixed
        # by the dims anyway) are noise here
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            try:
                import onnxscript  # noqa: F401
            except ImportError:
                raise UserError("the dynamo ONNX exporter needs the onnxscript package: pip "
                                "install -r requirements-export.txt") from None
            batch = torch.export.Dim("batch", min=1)
            program = torch.onnx.export(module, (example,), dynamo=True,
                                        opset_version=max(opset, DYNAMO_MIN_OPSET),
                                        input_names=["images"], output_names=["logits"],
                                        dynamic_shapes=({0: batch},), verbose=False)
            program.save(str(path))
        else:
            torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset,
                              input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                              do_constant_folding=True)


def quantize_onnx(fp32, int8, calibration: list[torch.Tensor] | None = None) -> None:
    """ONNX Runtime's int8 of the ONNX file `fp32`, written to `int8`: dynamic (weights int8,
    activations quantized on the fly), or static QDQ (activation ranges from the
    `calibration` image batches)."""
    try:
        from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                              quantize_dynamic, quantize_static)
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise UserError("ONNX int8 needs onnxruntime: pip install -r requirements-export.txt") \
            from None

    class Images(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self):
            x = next(self.batches, None)
            return None if x is None else {"images": x.numpy()}

    root = logging.getLogger()
    level = root.level
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the quantizer logs every int64 shape tensor it leaves alone to the root logger
        root.setLevel(logging.ERROR)
        try:
            prepared = os.path.join(tmp, "prepared.onnx")
            quant_pre_process(str(fp32), prepared)  # shape inference and graph clean-up
            if calibration is None:
                quantize_dynamic(prepared, str(int8), weight_type=QuantType.QInt8)
            else:
                quantize_static(prepared, str(int8), Images(), quant_format=QuantFormat.QDQ,
                                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)


def providers(runtime: str, device: torch.device, amp_dtype) -> list:
    if runtime == "tensorrt":
        trt = {"trt_fp16_enable": amp_dtype == torch.float16, "device_id": device.index or 0}
        return [("TensorrtExecutionProvider", trt),
                ("CUDAExecutionProvider", {"device_id": device.index or 0})]
    if device.type == "cuda":
        return [("CUDAExecutionProvider", {"device_id": device.index or 0})]
    return ["CPUExecutionProvider"]


def session_options():
    """torch's thread count, and no spinning once a run ends. A session's idle threads
    otherwise spin on after its run while the next session (or torch) runs: interleaving
    two DeiT-Ti sessions at batch 1 doubled each one's time on 2 cores (8.9 -> 17.7 ms);
    stopping the spin at the end of each run times each as it runs alone."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # as torch runs here
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.force_spinning_stop", "1")
    options.log_severity_level = 3
    return options


def _onnx_session(module: nn.Module, runtime: str, device: torch.device, amp_dtype,
                  example: torch.Tensor | None, int8: bool):
    import onnxruntime as ort
    if example is None:
        raise ValueError("an ONNX runtime needs an example input to export the module")
    with torch.no_grad():
        classes = module.eval()(example[:1]).shape[-1]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        export_onnx(module, path, example[:1])
        if int8:
            quantize_onnx(path, os.path.join(tmp, "int8.onnx"))
            path = os.path.join(tmp, "int8.onnx")
        session = ort.InferenceSession(path, session_options(),
                                       providers=providers(runtime, device, amp_dtype))
    module.to(device)
    if device.type != "cuda":
        def run(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(["logits"], {"images": x.detach().numpy()})[0])
        return run

    def run_bound(x: torch.Tensor) -> torch.Tensor:
        """Input and output stay on the GPU (I/O binding): no host copies in what is timed."""
        x = x.detach().to(device, torch.float32).contiguous()
        out = torch.empty(x.shape[0], classes, device=device)
        binding = session.io_binding()
        index = device.index if device.index is not None else torch.cuda.current_device()
        for bind, name, t in ((binding.bind_input, "images", x),
                              (binding.bind_output, "logits", out)):
            bind(name, "cuda", index, np.float32, tuple(t.shape), t.data_ptr())
        torch.cuda.current_stream(device).synchronize()  # x is written before ORT reads it
        session.run_with_iobinding(binding)
        return out
    return run_bound


def describe(runtime: str, device: torch.device) -> dict:
    """What a latency table or speed report records about its runtime."""
    out = {"runtime": runtime}
    if runtime in ONNX_RUNTIMES:
        import onnxruntime as ort
        out.update(onnxruntime=ort.__version__, threads=torch.get_num_threads(),
                   provider=[p if isinstance(p, str) else p[0]
                             for p in providers(runtime, device, None)][0])
    return out
