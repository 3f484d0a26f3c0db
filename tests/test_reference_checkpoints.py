"""NViT reference checkpoints (released models, masked pruning checkpoints) load exactly.

The expected logits come from a plain-torch re-statement of the reference's forward
(NVlabs/NViT `nvit/models.py`, DistilledVisionTransformer_small): each patch reordered to
(p1 p2 c) channels and a 1x1 convolution, q, k, v times a per-token scale, attention scale
64^-0.5, two heads averaged in eval. The masked layout is converted with a re-statement of
`finetune_dense.py`'s rule (widths from non-zero weights, head mask folded into Q, K, V).
"""
from __future__ import annotations

import argparse
import sys

import pytest
import torch
import torch.nn.functional as F

import models
from errors import UserError
from helpers import TRAIN, run_here

P, IMG, C, CLASSES = 4, 16, 3, 7
DIM = {"EMB": 24, "head": [2, 3], "QK": [8, 4], "V": [6, 4], "MLP": [40, 16]}
TOKENS = (IMG // P) ** 2 + 2


def released_state(gen: torch.Generator, dim: dict = DIM, img: int = IMG,
                   classes: int = CLASSES) -> dict:
    """Random weights in the released layout, every tensor non-trivial (token scale too)."""
    E = dim["EMB"]
    TOKENS, CLASSES = (img // P) ** 2 + 2, classes  # noqa: N806
    r = lambda *s: torch.randn(*s, generator=gen) * 0.3  # noqa: E731
    sd = {"cls_token": r(1, 1, E), "dist_token": r(1, 1, E), "pos_embed": r(1, TOKENS, E),
          "patch_embed.proj.weight": r(E, P * P * C, 1, 1), "patch_embed.proj.bias": r(E),
          "norm.weight": 1 + r(E), "norm.bias": r(E), "head.weight": r(CLASSES, E),
          "head.bias": r(CLASSES), "head_dist.weight": r(CLASSES, E), "head_dist.bias": r(CLASSES)}
    for i, (h, q, v, m) in enumerate(zip(dim["head"], dim["QK"], dim["V"], dim["MLP"])):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": 1 + r(E), p + "norm1.bias": r(E),
                   p + "norm2.weight": 1 + r(E), p + "norm2.bias": r(E),
                   p + "attn.qkv.Q.weight": r(h * q, E), p + "attn.qkv.Q.bias": r(h * q),
                   p + "attn.qkv.K.weight": r(h * q, E), p + "attn.qkv.K.bias": r(h * q),
                   p + "attn.qkv.V.weight": r(h * v, E), p + "attn.qkv.V.bias": r(h * v),
                   p + "attn.qkv.token_mask": 1 + r(TOKENS, 1),
                   p + "attn.proj.proj.weight": r(E, h * v), p + "attn.proj.proj.bias": r(E),
                   p + "mlp.fc1.weight": r(m, E), p + "mlp.fc1.bias": r(m),
                   p + "mlp.fc2.weight": r(E, m), p + "mlp.fc2.bias": r(E)})
    return sd


def reference_forward(sd: dict, dim: dict, x: torch.Tensor) -> torch.Tensor:
    """The reference's eval forward, written out: mean of the class and distillation heads."""
    B, _, H, W = x.shape
    E = dim["EMB"]
    t = x.reshape(B, C, H // P, P, W // P, P).permute(0, 3, 5, 1, 2, 4)  # b p1 p2 c h w
    t = F.conv2d(t.reshape(B, P * P * C, H // P, W // P), sd["patch_embed.proj.weight"],
                 sd["patch_embed.proj.bias"]).flatten(2).transpose(1, 2)
    z = torch.cat([sd["cls_token"].expand(B, -1, -1), sd["dist_token"].expand(B, -1, -1), t], 1)
    z = z + sd["pos_embed"]
    N = z.shape[1]
    ln = lambda v, n: F.layer_norm(v, (E,), sd[n + ".weight"], sd[n + ".bias"], 1e-6)  # noqa: E731
    for i, (h, q, v) in enumerate(zip(dim["head"], dim["QK"], dim["V"])):
        p = f"blocks.{i}."
        y = ln(z, p + "norm1")
        tm = sd[p + "attn.qkv.token_mask"]
        qq, kk, vv = (F.linear(y, sd[p + f"attn.qkv.{n}.weight"], sd[p + f"attn.qkv.{n}.bias"]) * tm
                      for n in "QKV")
        qq = qq.reshape(B, N, h, q).permute(0, 2, 1, 3)
        kk = kk.reshape(B, N, h, q).permute(0, 2, 1, 3)
        vv = vv.reshape(B, N, h, v).permute(0, 2, 1, 3)
        attn = ((qq @ kk.transpose(-2, -1)) * 64 ** -0.5).softmax(-1)
        o = (attn @ vv).transpose(1, 2).reshape(B, N, h * v)
        z = z + F.linear(o, sd[p + "attn.proj.proj.weight"], sd[p + "attn.proj.proj.bias"])
        y = ln(z, p + "norm2")
        y = F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
        z = z + F.linear(y, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    z = ln(z, "norm")
    return (F.linear(z[:, 0], sd["head.weight"], sd["head.bias"])
            + F.linear(z[:, 1], sd["head_dist.weight"], sd["head_dist.bias"])) / 2


def save_released(path, sd: dict, dim: dict = DIM) -> None:
    """A file as finetune_dense.py wrote it: weights, dims and the argparse Namespace."""
    args = argparse.Namespace(model="deit_base_distilled_patch16_224", lr=2e-4, epochs=300,
                              distillation_type="hard", nb_classes=CLASSES)
    torch.save({"model": sd, "model_ema": sd, "dim": dim, "args": args, "epoch": 300}, path)


@pytest.fixture
def released(tmp_path):
    sd = released_state(torch.Generator().manual_seed(0))
    path = tmp_path / "NViT_tiny.pth"
    save_released(path, sd)
    return path, sd


def test_released_checkpoint_gives_reference_logits(released):
    path, sd = released
    model = models.build_model("deit_base_distilled_patch16_224", checkpoint=path).eval()
    d = model.dims
    assert (d.embed_dim, d.num_heads, d.qk_dim, d.v_dim, d.mlp_dim) == \
        (24, [2, 3], [8, 4], [6, 4], [40, 16])
    assert d.attn_scale == [64 ** -0.5] * 2 and d.token_scale and d.patch_size == P
    assert (d.img_size, d.num_classes, d.distilled) == (IMG, CLASSES, True)
    x = torch.randn(3, C, IMG, IMG, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_forward(sd, DIM, x), rtol=1e-5, atol=1e-5)
        # a wrong patch order would show: the same weights read as (c p1 p2) differ
        wrong = dict(sd)
        w = sd["patch_embed.proj.weight"]
        wrong["patch_embed.proj.weight"] = w.reshape(24, C, P, P).permute(0, 2, 3, 1).reshape(w.shape)
        assert not torch.allclose(reference_forward(wrong, DIM, x), model(x), atol=1e-3)


def test_released_checkpoint_never_unpickles_unknown_classes(tmp_path):
    sd = released_state(torch.Generator().manual_seed(0))
    path = tmp_path / "evil.pth"
    torch.save({"model": sd, "dim": DIM, "args": argparse.Namespace(x=Exploit())}, path)
    Exploit.ran = False
    with pytest.raises(UserError, match=r"evil.pth holds a pickled \S*_mark_exploit_ran.*nothing"):
        models.build_model("deit_base_distilled_patch16_224", checkpoint=path)
    assert not Exploit.ran


def _mark_exploit_ran() -> None:
    Exploit.ran = True


class Exploit:
    """Unpickling this calls a function of ours: weights-only loading must refuse it."""
    ran = False

    def __reduce__(self):
        return (_mark_exploit_ran, ())


def test_released_checkpoint_needs_its_dims(tmp_path):
    sd = released_state(torch.Generator().manual_seed(0))
    path = tmp_path / "nodim.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(UserError, match="'dim' entry"):
        models.build_model("deit_base_distilled_patch16_224", checkpoint=path)


def test_released_checkpoint_exports_and_reports_its_size(released, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from tools import export as export_tool
    from tools import model_info

    path, sd = released
    export_tool.export(str(path), output_dir=str(tmp_path / "deploy"), name="nvit")
    x = torch.randn(2, C, IMG, IMG, generator=torch.Generator().manual_seed(2))
    session = ort.InferenceSession(str(tmp_path / "deploy" / "nvit.onnx"),
                                   providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"images": x.numpy()})[0]
    assert abs(got - reference_forward(sd, DIM, x).numpy()).max() <= 1e-4
    args = model_info.get_args_parser().parse_args(["--checkpoint", str(path)])
    info = model_info.model_info(model_info.build_from_args(args))
    assert info["params"] == sum(t.numel() for t in sd.values()) and info["token_scale"]


# ------------------------------------------------------------------ masked layout
FULL = {"EMB": 32, "head": [4, 4], "QK": [8, 8], "V": [8, 8], "MLP": [48, 48]}


def masked_state(gen: torch.Generator) -> tuple[dict, dict]:
    """A full-width model in the reference's pruning layout with units zeroed, a trained
    (non-trivial) head mask, and the widths it should convert to."""
    E, H, Q, V, M = 32, 4, 8, 8, 48
    r = lambda *s: torch.randn(*s, generator=gen) * 0.3  # noqa: E731
    emb_dead = [1, 5, 6, 20, 31]
    sd = {"cls_token": r(1, 1, E), "dist_token": r(1, 1, E), "pos_embed": r(1, TOKENS, E),
          "patch_embed.proj.weight": r(E, P * P * C, 1, 1), "patch_embed.proj.bias": r(E),
          "norm.weight": 1 + r(E), "norm.bias": r(E), "head.weight": r(CLASSES, E),
          "head.bias": r(CLASSES), "head_dist.weight": r(CLASSES, E), "head_dist.bias": r(CLASSES)}
    sd["patch_embed.proj.weight"][emb_dead] = 0
    dead = [{"head": [1], "qk": [0, 3, 7], "v": [2], "mlp": list(range(0, 48, 3))},
            {"head": [0, 3], "qk": [1], "v": [0, 1, 5, 6], "mlp": [7, 8, 9]}]
    for i, dd in enumerate(dead):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": 1 + r(E), p + "norm1.bias": r(E),
                   p + "norm2.weight": 1 + r(E), p + "norm2.bias": r(E),
                   p + "attn.qkv.token_mask": 1 + r(TOKENS, 1),
                   p + "attn.qkv.head_mask.weight": 1 + r(H, 1),
                   p + "attn.proj.weight": r(E, V, H), p + "attn.proj.bias": r(E),
                   p + "mlp.fc1.weight": r(M, E), p + "mlp.fc1.bias": r(M),
                   p + "mlp.fc2.weight": r(E, M), p + "mlp.fc2.bias": r(E)})
        for n, width in (("Q", Q), ("K", Q), ("V", V)):
            w, b = r(width, E, H), r(width, H)
            w[:, :, dd["head"]] = 0
            b[:, dd["head"]] = 0
            units = dd["qk"] if n != "V" else dd["v"]
            w[units] = 0
            b[units] = 0
            sd[p + f"attn.qkv.{n}.weight"], sd[p + f"attn.qkv.{n}.bias"] = w, b
        sd[p + "attn.qkv.head_mask.weight"][dd["head"]] = 0
        sd[p + "mlp.fc1.weight"][dd["mlp"]] = 0
    widths = {"EMB": E - len(emb_dead), "head": [H - len(d["head"]) for d in dead],
              "QK": [Q - len(d["qk"]) for d in dead], "V": [V - len(d["v"]) for d in dead],
              "MLP": [M - len(d["mlp"]) for d in dead]}
    return sd, widths


def finetune_dense_conversion(sd: dict) -> tuple[dict, dict]:
    """finetune_dense.py's rule, re-stated: widths from non-zero weights, head mask folded."""
    live = lambda t, keep: torch.nonzero(t.abs().sum([d for d in range(t.dim()) if d != keep]) != 0).flatten()  # noqa: E501,E731
    e = live(sd["patch_embed.proj.weight"], 0)
    out = {k: sd[k][..., e] for k in ("cls_token", "dist_token", "pos_embed")}
    out.update({"patch_embed.proj.weight": sd["patch_embed.proj.weight"][e],
                "patch_embed.proj.bias": sd["patch_embed.proj.bias"][e],
                "norm.weight": sd["norm.weight"][e], "norm.bias": sd["norm.bias"][e],
                "head.weight": sd["head.weight"][:, e], "head.bias": sd["head.bias"],
                "head_dist.weight": sd["head_dist.weight"][:, e], "head_dist.bias": sd["head_dist.bias"]})
    dim = {"EMB": len(e), "head": [], "QK": [], "V": [], "MLP": []}
    for i in range(2):
        p = f"blocks.{i}."
        for n in ("norm1", "norm2"):
            out[f"{p}{n}.weight"], out[f"{p}{n}.bias"] = sd[f"{p}{n}.weight"][e], sd[f"{p}{n}.bias"][e]
        hm = sd[p + "attn.qkv.head_mask.weight"].reshape(-1)
        qw = sd[p + "attn.qkv.Q.weight"]
        dim["head"].append(len(live(qw, 2)))
        dim["QK"].append(len(live(qw, 0)))
        mats = {}
        for n in "QKV":
            w = (sd[p + f"attn.qkv.{n}.weight"] * hm).permute(2, 0, 1).reshape(-1, 32)  # (h q) e
            b = (sd[p + f"attn.qkv.{n}.bias"] * hm).t().reshape(-1)
            mats[n] = (w, b)
        qk_rows = torch.nonzero(mats["Q"][0].abs().sum(1) != 0).flatten()
        v_rows = torch.nonzero(mats["V"][0].abs().sum(1) != 0).flatten()
        dim["V"].append(len(live(sd[p + "attn.qkv.V.weight"], 0)))
        for n, rows in (("Q", qk_rows), ("K", qk_rows), ("V", v_rows)):
            out[p + f"attn.qkv.{n}.weight"] = mats[n][0][rows][:, e]
            out[p + f"attn.qkv.{n}.bias"] = mats[n][1][rows]
        pw = sd[p + "attn.proj.weight"].permute(0, 2, 1).reshape(32, -1)  # e (h v)
        out[p + "attn.proj.proj.weight"] = pw[e][:, v_rows]
        out[p + "attn.proj.proj.bias"] = sd[p + "attn.proj.bias"][e]
        out[p + "attn.qkv.token_mask"] = sd[p + "attn.qkv.token_mask"]
        m = live(sd[p + "mlp.fc1.weight"], 0)
        dim["MLP"].append(len(m))
        out[p + "mlp.fc1.weight"] = sd[p + "mlp.fc1.weight"][m][:, e]
        out[p + "mlp.fc1.bias"] = sd[p + "mlp.fc1.bias"][m]
        out[p + "mlp.fc2.weight"] = sd[p + "mlp.fc2.weight"][e][:, m]
        out[p + "mlp.fc2.bias"] = sd[p + "mlp.fc2.bias"][e]
    return out, dim


def test_masked_pruning_checkpoint_converts_as_finetune_dense(tmp_path):
    sd, widths = masked_state(torch.Generator().manual_seed(3))
    path = tmp_path / "pruned_checkpoint.pth"
    torch.save({"model": sd, "args": argparse.Namespace(pruning=True), "epoch": 3}, path)
    model = models.build_model("deit_base_distilled_patch16_224", checkpoint=path).eval()
    dense, dim = finetune_dense_conversion(sd)
    assert dim == widths
    d = model.dims
    assert (d.embed_dim, d.num_heads, d.qk_dim, d.v_dim, d.mlp_dim) == \
        (dim["EMB"], dim["head"], dim["QK"], dim["V"], dim["MLP"])
    x = torch.randn(2, C, IMG, IMG, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_forward(dense, dim, x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_released_checkpoint_evaluates_and_finetunes_from_a_folder(tmp_path):
    """--eval of a released model, and --finetune FOLDER finding pruned_checkpoint.pth and
    writing into the folder as finetune_dense.py did."""
    dim = {"EMB": 24, "head": [2, 2], "QK": [8, 8], "V": [8, 8], "MLP": [32, 32]}
    sd = released_state(torch.Generator().manual_seed(0), dim, img=32, classes=10)
    folder = tmp_path / "pruned_run"
    folder.mkdir()
    save_released(folder / "pruned_checkpoint.pth", sd, dim)
    fast = [a for i, a in enumerate(TRAIN) if "--patch-size" not in TRAIN[max(i - 1, 0):i + 1]]
    ev = run_here("revit_scratch.py", *fast, "--eval", "--finetune", folder)
    assert "Accuracy of the network on the 359 test images" in ev.stdout, ev.stderr[-2000:]
    ft = run_here("revit_scratch.py", *fast, "--finetune", folder, "--epochs", "1", "--lr", "1e-4")
    assert ft.returncode == 0, ft.stderr[-2000:]
    out = folder / "ft_dense_1_lr_0.0001_a_0.5_T_1.0_CNN_only"
    assert "student in eval mode" in ft.stdout and (out / "checkpoint.pth").is_file()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
