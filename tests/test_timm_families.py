"""The timm ViT family (issue 11): DeiT, ViT/AugReg, DeiT III, DINOv2 with and without
registers, average pooling with and without fc_norm, no qkv bias, patch 14.

Each family is a tiny model built by timm's own constructor from a real timm name (its
family flags as timm registers them; widths shrunk), with random weights large enough that
a wrong mapping shows in the logits.
"""
from __future__ import annotations

import copy
import json
import re
import signal

import pytest
import torch
import timm
from timm.layers import resample_abs_pos_embed

import models
from errors import UserError
from helpers import DENSE_DIMS, FAST, PRUNE_FLAGS, assert_user_error, run_here
from models.timm_vit import FAMILIES as TABLE
from models.timm_vit import FAMILY_KWARGS
from models.timm_vit import load_nvit, nvit_to_timm_vit, timm_vit_dims, timm_vit_to_nvit
from pruning import Gates, compact
from models.flops import count_macs
from pruning.cost import MacsCost, ParamsCost
from test_pruning_gates import emb_producer_sum, random_masks, soften

# family (models/timm_vit.py's table) -> the family fields its tiny model must read as
EXPECTED = {
    "DeiT, distilled": dict(distilled=True),
    "DeiT": dict(distilled=False),
    "ViT / AugReg": dict(distilled=False),
    "DeiT III": dict(layer_scale=1e-6, no_embed_class=True),
    "DINOv2": dict(layer_scale=1e-5, patch_size=14),
    "DINOv2 with registers": dict(layer_scale=1e-5, reg_tokens=4, no_embed_class=True,
                                  patch_size=14),
    "ViT, registers, avg pool + fc_norm": dict(class_token=False, reg_tokens=4,
                                               global_pool="avg", fc_norm=True),
    "ViT, avg pool": dict(class_token=False, global_pool="avg", fc_norm=False),
    "ViT, no qkv bias": dict(qkv_bias=False),
    "ViT, no qkv bias, LayerScale, avg pool": dict(qkv_bias=False, layer_scale=1e-6,
                                                   global_pool="avg"),
    "CLIP (pre-norm)": dict(pre_norm=True, ln_eps=1e-5, mlp_act="gelu"),
    "CLIP, QuickGELU": dict(pre_norm=True, ln_eps=1e-5, mlp_act="quick_gelu"),
    "ViT, qk-norm": dict(qk_norm=True),
    "DINOv2-g (packed SwiGLU)": dict(mlp_act="swiglu_packed", layer_scale=1e-5, patch_size=14),
    "SigLIP (attention pooling)": dict(global_pool="map", class_token=False),
    "SigLIP So400m": dict(global_pool="map", class_token=False, patch_size=14),
    "EVA-02 (rotary, packed SwiGLU)": dict(layout="eva", k_bias=False, rope_dim=8,
                                           rope_ref_grid=16, mlp_act="swiglu_packed",
                                           global_pool="avg", fc_norm=True, patch_size=14),
    "EVA-02 B/L (SwiGLU with inner norm, separate q/k/v)": dict(
        layout="eva", qkv_fused=False, k_bias=False, mlp_act="swiglu", mlp_norm=True,
        rope_dim=8, global_pool="avg", fc_norm=True, patch_size=14),
    "EVA-02 CLIP": dict(layout="eva", qkv_fused=False, mlp_act="swiglu", mlp_norm=True,
                        attn_norm=True, rope_dim=8, global_pool="token", fc_norm=False),
    "RoPE ViT": dict(layout="eva", abs_pos_embed=False, rope_dim=8, rope_temperature=100.0,
                     rope_grid_indexing="xy", layer_scale=1e-5),
    "RoPE ViT, registers, avg pool": dict(layout="eva", class_token=False, reg_tokens=1,
                                          k_bias=False, abs_pos_embed=False, rope_dim=8,
                                          rope_ref_grid=16, layer_scale=1e-5,
                                          global_pool="avg", fc_norm=True),
}
FAMILIES = {f: (TABLE[f], EXPECTED[f]) for f in TABLE}
FAMILY_IDS = list(FAMILIES)
NAME_KWARGS = {TABLE[f]: kw for f, kw in FAMILY_KWARGS.items()}


def test_every_family_in_the_table_is_tested():
    assert set(EXPECTED) == set(TABLE)


def tiny_timm(name: str, seed: int = 0, img_size: int | None = None, **kwargs) -> torch.nn.Module:
    """timm's model for `name` (with timm `kwargs`) with tiny widths (8 per head), 2 blocks,
    10 classes; a family that is a name with timm kwargs gets them."""
    kwargs = {**NAME_KWARGS.get(name, {}), **kwargs}
    with torch.device("meta"):
        heads = timm.create_model(name).blocks[0].attn.num_heads
    patch = 14 if "patch14" in name else 8
    torch.manual_seed(seed)
    vit = timm.create_model(name, img_size=img_size or (3 * patch if patch == 14 else 32),
                            patch_size=patch, embed_dim=8 * heads, depth=2, num_classes=10,
                            **kwargs)
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_(0, 0.1)
    return vit.eval()


def ours_from_file(name: str, vit: torch.nn.Module, tmp_path, **kw) -> models.ReViT:
    """Our model from timm's state dict of `vit` (a RoPE ViT's image size is not in its
    weights: given as timm's)."""
    path = tmp_path / "timm.pth"
    torch.save(vit.state_dict(), path)
    if getattr(vit, "pos_embed", None) is None:
        kw = {"img_size": vit.patch_embed.img_size[0], **kw}
    return models.build_model(name, checkpoint=path, **kw).eval()


def logits(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m(x)


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_timm_state_dict_reproduces_timm_logits(family, tmp_path):
    name, fields = FAMILIES[family]
    vit = tiny_timm(name)
    ours = ours_from_file(name, vit, tmp_path)
    for key, value in fields.items():
        assert getattr(ours.dims, key) == value, key
    x = torch.randn(3, 3, ours.dims.img_size, ours.dims.img_size)
    ref = logits(vit, x)
    assert ref.abs().max() > 0.1
    assert torch.equal(logits(ours, x), ref)  # bitwise: the same operations in the same order
    # the module route (Torch-Pruning's results) reads the same model
    via_module = load_nvit(*timm_vit_to_nvit(vit)).eval()
    assert via_module.dims == ours.dims
    assert torch.equal(logits(via_module, x), ref)


@pytest.mark.parametrize("family", ["DINOv2 with registers", "ViT, registers, avg pool + fc_norm",
                                    "DeiT III", "CLIP, QuickGELU", "EVA-02 (rotary, packed SwiGLU)",
                                    "RoPE ViT, registers, avg pool"])
def test_timm_api_matches_timm_on_families(family, tmp_path):
    """Pre-logits and forward_intermediates (prefix tokens included) equal timm's."""
    name, _ = FAMILIES[family]
    vit = tiny_timm(name)
    ours = ours_from_file(name, vit, tmp_path)
    x = torch.randn(2, 3, ours.dims.img_size, ours.dims.img_size)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_head(ours.forward_features(x), pre_logits=True),
                                   vit.forward_head(vit.forward_features(x), pre_logits=True),
                                   rtol=0, atol=2e-5)
        a = ours.forward_intermediates(x, indices=[0, 1], return_prefix_tokens=True)
        b = vit.forward_intermediates(x, indices=[0, 1], return_prefix_tokens=True)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=2e-5)
    for (pa, xa), (pb, xb) in zip(a[1], b[1]):
        torch.testing.assert_close(pa, pb, rtol=0, atol=2e-5)
        torch.testing.assert_close(xa, xb, rtol=0, atol=2e-5)


@pytest.mark.parametrize("family", ["DeiT III", "DINOv2 with registers", "ViT, avg pool",
                                    "ViT, no qkv bias, LayerScale, avg pool", "CLIP, QuickGELU",
                                    "ViT, qk-norm", "DINOv2-g (packed SwiGLU)",
                                    "SigLIP (attention pooling)", "EVA-02 (rotary, packed SwiGLU)",
                                    "EVA-02 B/L (SwiGLU with inner norm, separate q/k/v)",
                                    "EVA-02 CLIP", "RoPE ViT", "RoPE ViT, registers, avg pool"])
def test_nvit_to_timm_round_trip(family, tmp_path):
    name, _ = FAMILIES[family]
    vit = tiny_timm(name)
    ours = ours_from_file(name, vit, tmp_path)
    back = nvit_to_timm_vit(ours).eval()
    x = torch.randn(2, 3, ours.dims.img_size, ours.dims.img_size)
    torch.testing.assert_close(logits(back, x), logits(vit, x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["DINOv2 with registers", "DINOv2", "DeiT III"])
def test_position_embedding_resampled_as_timm(family, tmp_path):
    """Another --input-size: the position embedding is resampled as timm's loader does
    (over the patches only when the prefix tokens have none)."""
    name, _ = FAMILIES[family]
    vit = tiny_timm(name)
    big = 5 * vit.patch_embed.patch_size[0]
    ours = ours_from_file(name, vit, tmp_path, img_size=big, adapt=True)
    grid = big // vit.patch_embed.patch_size[0]
    want = resample_abs_pos_embed(vit.pos_embed.detach(), (grid, grid),
                                  num_prefix_tokens=0 if vit.no_embed_class else vit.num_prefix_tokens)
    torch.testing.assert_close(ours.pos_embed.detach(), want)
    ref = tiny_timm(name, img_size=big)
    ref.load_state_dict({**vit.state_dict(), "pos_embed": want})
    x = torch.randn(2, 3, big, big)
    torch.testing.assert_close(logits(ours, x), logits(ref, x), rtol=0, atol=2e-5)


@pytest.mark.parametrize("family", ["DINOv2 with registers", "ViT, registers, avg pool + fc_norm",
                                    "ViT, no qkv bias, LayerScale, avg pool", "CLIP (pre-norm)",
                                    "CLIP, QuickGELU", "ViT, qk-norm",
                                    "DINOv2-g (packed SwiGLU)", "SigLIP (attention pooling)",
                                    "SigLIP So400m", "EVA-02 (rotary, packed SwiGLU)",
                                    "EVA-02 B/L (SwiGLU with inner norm, separate q/k/v)",
                                    "EVA-02 CLIP", "RoPE ViT", "RoPE ViT, registers, avg pool"])
@pytest.mark.parametrize("seed", [0, 1])
def test_masked_model_equals_compact_model(family, seed, tmp_path):
    """Random masks over all five kinds: the compact model computes what the gated one does;
    LayerScale gammas, register tokens and fc_norm are compacted with the embedding."""
    name, _ = FAMILIES[family]
    model = ours_from_file(name, tiny_timm(name, seed=seed), tmp_path)
    gates = Gates.attach(model)
    masks, widths = random_masks(model.dims, seed, shared_qk=model.dims.qk_norm)
    gates.load_masks(masks)
    small = compact(model).eval()
    x = torch.randn(3, 3, model.dims.img_size, model.dims.img_size)
    torch.testing.assert_close(logits(small, x), logits(model, x), rtol=0, atol=1e-5)
    for key, val in widths.items():
        assert getattr(small.dims, key) == val
    for f in ("class_token", "reg_tokens", "layer_scale", "qkv_bias", "no_embed_class",
              "global_pool", "fc_norm"):
        assert getattr(small.dims, f) == getattr(model.dims, f)
    if small.reg_token is not None:
        assert small.reg_token.shape == (1, model.dims.reg_tokens, widths["embed_dim"])
    if model.dims.layer_scale:
        gamma = small.blocks[0].gamma_1 if model.dims.layout == "eva" else small.blocks[0].ls1.gamma
        assert gamma.shape == (widths["embed_dim"],)
    if model.dims.rope_dim:  # each block rotates by its kept pairs' frequencies
        table = model.rope.get_embed()
        for i, blk in enumerate(small.blocks):
            kept = torch.nonzero(masks["blocks"][i]["qk"][masks["blocks"][i]["head"]][0]).flatten()
            assert small.dims.rope_dims[i] == kept.tolist()
            cols = torch.cat([kept, kept + model.dims.rope_dim])
            index = blk.attn.rope_index  # None: the whole table
            assert torch.equal(table if index is None else table.index_select(-1, index),
                               table[:, cols])


def test_soft_gates_fold_into_layer_scale_models(tmp_path):
    name, _ = FAMILIES["DINOv2 with registers"]
    model = ours_from_file(name, tiny_timm(name), tmp_path)
    soften(Gates.attach(model))
    small = compact(model).eval()
    x = torch.randn(2, 3, model.dims.img_size, model.dims.img_size)
    torch.testing.assert_close(logits(small, x), logits(model, x), rtol=0, atol=1e-5)


def test_embedding_saliency_includes_layer_scale_and_register_tokens(tmp_path):
    """The embedding gate's gradient is sum(theta * dL/dtheta) over everything a channel
    produces, LayerScale gammas, register tokens and fc_norm included (model without qkv
    bias: the head gate's sum has no bias rows)."""
    name, _ = FAMILIES["ViT, registers, avg pool + fc_norm"]
    plain = ours_from_file(name, tiny_timm(name), tmp_path).double()
    dims = plain.dims
    gated = copy.deepcopy(plain)
    x, target = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    torch.nn.functional.cross_entropy(plain(x), target).backward()
    gates = Gates.attach(gated, dtype=torch.float64)
    torch.nn.functional.cross_entropy(gated(x), target).backward()
    assert dims.reg_tokens == 4 and dims.fc_norm and plain.cls_token is None
    for c in (0, 5, 17):
        want = emb_producer_sum(plain, c)
        torch.testing.assert_close(gates.embs[0].grad[c], want.detach(), rtol=1e-6, atol=1e-12)
    # LayerScale: DINOv2 with registers
    name, _ = FAMILIES["DINOv2 with registers"]
    plain = ours_from_file(name, tiny_timm(name), tmp_path).double()
    gated = copy.deepcopy(plain)
    x = torch.randn(4, 3, 42, 42, dtype=torch.float64)
    torch.nn.functional.cross_entropy(plain(x), target).backward()
    gates = Gates.attach(gated, dtype=torch.float64)
    torch.nn.functional.cross_entropy(gated(x), target).backward()
    assert plain.dims.layer_scale and plain.reg_token is not None
    want = emb_producer_sum(plain, 3)
    torch.testing.assert_close(gates.embs[0].grad[3], want.detach(), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_cost_models_count_the_extra_tokens_and_parameters(family, tmp_path):
    name, _ = FAMILIES[family]
    model = ours_from_file(name, tiny_timm(name), tmp_path)
    d = model.dims
    assert ParamsCost(d).total(d) == sum(p.numel() for p in model.parameters())
    assert MacsCost(d).total(d) == count_macs(model)[0]


REFUSED = {
    "a gated MLP other than SwiGLUPacked": "swiglu",
    "parallel blocks": "parallel",
    "an attention pool with more than one latent query": "map_latents",
    "a norm on q or on k alone": "q_norm_only",
    "a patch-embedding bias with pre-norm": "pre_norm_bias",
    "MLP activation": dict(act_layer="gelu_tanh"),
    "learned mixed rotary frequencies": dict(eva=True, rope_type="mixed"),
    "grouped-query attention": dict(eva=True, attn_type="rope", qkv_fused=False,
                                    num_kv_heads=1),
    "LayerScale on one branch only": dict(eva=True, init_values=0.1,
                                          attn_only_layer_scale=True),
    "rotary frequencies over pixels": dict(eva=True, rope_grid_offset=0.5),
    "post-norm blocks": dict(eva=True, use_post_norm=True),
}


@pytest.mark.parametrize("feature", list(REFUSED))
def test_unsupported_timm_features_are_refused_by_name(feature):
    from timm.models.vision_transformer import VisionTransformer
    spec = REFUSED[feature]
    frame = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=10)
    if isinstance(spec, dict) and spec.get("eva"):
        from timm.models.eva import Eva
        kw = {k: v for k, v in spec.items() if k != "eva"}
        vit = Eva(**frame, use_rot_pos_emb=not kw.get("use_post_norm"), **kw)
    elif spec == "swiglu":
        from timm.layers import GluMlp
        vit = VisionTransformer(**frame, mlp_layer=GluMlp, act_layer=torch.nn.Sigmoid)
    elif spec == "map_latents":
        vit = VisionTransformer(**frame, global_pool="map")
        vit.attn_pool.latent_len = 2
    elif spec == "q_norm_only":
        vit = VisionTransformer(**frame, qk_norm=True)
        vit.blocks[0].attn.k_norm = torch.nn.Identity()
    elif spec == "pre_norm_bias":
        from timm.layers import PatchEmbed
        vit = VisionTransformer(**frame, pre_norm=True)
        vit.patch_embed = PatchEmbed(32, 8, 3, 32)
    elif spec == "parallel":
        from timm.models.vision_transformer import ParallelScalingBlock
        vit = VisionTransformer(**frame, block_fn=ParallelScalingBlock)
    else:
        vit = VisionTransformer(**frame, **spec)
    with pytest.raises(UserError, match=feature) as e:
        timm_vit_dims(vit)
    assert "\n" not in str(e.value)


def test_unsupported_timm_name_is_one_line_from_the_scripts(tmp_path):
    args = [a for a in FAST if a not in ("--model", "deit_tiny_distilled_patch16_224")]
    proc = run_here("revit_scratch.py", *args, "--model", "vit_small_patch16_18x2_224",
                    "--epochs", "1", "--output_dir", tmp_path / "out")
    assert_user_error(proc, "vit_small_patch16_18x2_224", "parallel blocks", "--model")


def test_distillation_without_a_distillation_token_is_refused(tmp_path):
    args = [a for a in FAST if a not in ("--model", "deit_tiny_distilled_patch16_224")]
    proc = run_here("revit_scratch.py", *args, "--model", "deit3_small_patch16_224",
                    "--distillation-type", "hard", "--teacher-model", "resnet18",
                    "--epochs", "1", "--output_dir", tmp_path / "out")
    assert_user_error(proc, "distillation token", "deit3_small_patch16_224")


@pytest.mark.slow
def test_prune_compact_evaluate_a_deit3_style_model(tmp_path, monkeypatch):
    """nvit_prune.py on a DeiT III-style model (LayerScale, position embedding without the
    class token), KL to the full model: pruned, compact, evaluated; an interrupted run
    resumes to the same model."""
    torch.manual_seed(0)
    name = "deit3_small_patch16_224"
    dense = models.build_model(name, dims=models.Dims(**DENSE_DIMS), img_size=32, patch_size=8,
                               num_classes=10)
    assert dense.dims.layer_scale == 1e-6 and dense.dims.no_embed_class and not dense.distilled
    with torch.no_grad():  # a trained DeiT III's gammas are far from their 1e-6 start
        for blk in dense.blocks:
            blk.ls1.gamma.normal_(0.5, 0.1)
            blk.ls2.gamma.normal_(0.5, 0.1)
    ckpt = tmp_path / "dense.pth"
    torch.save({"model": dense.state_dict(), "dims": dense.dims.to_dict()}, ckpt)
    out = tmp_path / "pruned"
    args = [a for a in FAST if a not in ("--model", "deit_tiny_distilled_patch16_224")]
    proc = run_here("nvit_prune.py", *args, *PRUNE_FLAGS, "--model", name,
                    "--pretrained-path", ckpt, "--cost", "macs", "--latency_target", "0.6",
                    "--epochs", "2", "--output_dir", out, "--pruning_exit")
    assert proc.returncode == 0, proc.stderr[-3000:]
    pruned = out / "pruned_checkpoint.pth"
    small = models.build_model(name, checkpoint=pruned)
    assert small.dims.layer_scale == 1e-6 and small.dims.no_embed_class
    assert small.dims.embed_dim < 64 or sum(small.dims.mlp_dim) < 3 * 128
    assert count_macs(small)[0] <= 0.6 * count_macs(dense)[0]
    top1 = float(re.search(r"pruned model: .* top-1 ([\d.]+)%", proc.stdout).group(1))
    ev = run_here("revit_scratch.py", *args, "--model", name, "--no-model-ema",
                  "--finetune", pruned, "--eval")
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert float(re.search(r"top-1 ([\d.]+)%", ev.stdout).group(1)) == pytest.approx(top1, abs=0.006)
    # Ctrl-C at the third prune step, then --resume: the same compact model, bitwise
    import prune_recorder
    line = prune_recorder.prune_step_line

    def interrupt(record, loop, cost):
        if record["step"] == 3:
            signal.raise_signal(signal.SIGINT)
        return line(record, loop, cost)
    monkeypatch.setattr(prune_recorder, "prune_step_line", interrupt)
    part = tmp_path / "part"
    common = [*args, *PRUNE_FLAGS, "--model", name, "--pretrained-path", ckpt, "--cost", "macs",
              "--latency_target", "0.6", "--epochs", "2", "--output_dir", part, "--pruning_exit"]
    assert run_here("nvit_prune.py", *common).returncode == 130
    assert not (part / "pruned_checkpoint.pth").exists()
    monkeypatch.setattr(prune_recorder, "prune_step_line", line)
    assert run_here("nvit_prune.py", *common, "--resume").returncode == 0
    a = torch.load(pruned, weights_only=True)["model"]
    b = torch.load(part / "pruned_checkpoint.pth", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", ["DINOv2 with registers", "ViT, registers, avg pool + fc_norm"])
def test_pruned_family_model_exports_to_onnx_and_safetensors(family, tmp_path):
    """A compact model of the family exports (the tool's onnxruntime check included) and
    its safetensors file rebuilds it exactly."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from test_tools import export_tool
    name, _ = FAMILIES[family]
    model = ours_from_file(name, tiny_timm(name), tmp_path)
    gates = Gates.attach(model)
    gates.load_masks(random_masks(model.dims, 3)[0])
    small = compact(model).eval()
    ckpt = tmp_path / "small.pth"
    torch.save({"model": small.state_dict(), "dims": small.dims.to_dict()}, ckpt)
    files = export_tool.export(str(ckpt), output_dir=str(tmp_path / "deploy"), name="net")
    rebuilt = models.build_model("deit_base_patch16_224", checkpoint=files["safetensors"]).eval()
    assert rebuilt.dims == small.dims
    x = torch.randn(2, 3, small.dims.img_size, small.dims.img_size)
    assert torch.equal(logits(rebuilt, x), logits(small, x))


def test_model_info_lists_the_families(capsys):
    from test_tools import model_info
    assert model_info.main(["--families", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list(TABLE.values())
    reg = next(r for r in rows if r["name"] == TABLE["DINOv2 with registers"])
    assert reg["tokens"] == "cls + 4 reg" and reg["pos_embed"] == "patches" and reg["patch"] == 14
    assert model_info.main(["--model", TABLE["DeiT III"], "--input-size", "32",
                            "--patch-size", "8"]) == 0
    assert "LayerScale 1e-06" in capsys.readouterr().out


@pytest.mark.parametrize("fields, words", [
    (dict(reg_tokens=-1), "reg_tokens must be an integer >= 0"),
    (dict(layer_scale=-0.1), "layer_scale"),
    (dict(global_pool="max"), "global_pool must be one of token, avg, map"),
    (dict(class_token=False), "global_pool 'token' needs a class token"),
    (dict(distilled=True, global_pool="avg"), "a distilled model pools"),
    (dict(distilled=True, fc_norm=True), "a distilled model pools"),
])
def test_impossible_family_fields_are_refused_by_name(fields, words):
    base = dict(embed_dim=32, num_heads=[2], qk_dim=[8], v_dim=[8], mlp_dim=[16])
    with pytest.raises(UserError, match=re.escape(words)):
        models.Dims(**base, **fields)
    with pytest.raises(UserError, match="reg_tokens must be an integer"):
        models.Dims.from_dict({**base, "reg_tokens": 1.5})
    assert models.Dims(**base, class_token=False, global_pool="avg").num_prefix_tokens == 0
