"""The README's reference commands (NViT-B pruning and finetuning, ReViT-T) parse as typed and
mean what the reference's meant."""
from __future__ import annotations

import re
import shlex


import flags
import nvit_prune
import revit_scratch
from helpers import ROOT


def readme_commands(script: str) -> list[list[str]]:
    """Every command in the README's code blocks that runs `script`, as its argument list."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("#")[0].strip()
            words = shlex.split(line) if line else []
            if script in words:
                commands.append(words[words.index(script) + 1:])
    return commands


def test_nvit_b_pruning_command():
    (cmd,) = [c for c in readme_commands("nvit_prune.py") if "--latency_target" in " ".join(c)
              and "IMNET" in c]
    args = nvit_prune.get_args_parser().parse_args(cmd)
    assert (args.kl_loss_coeff, args.original_loss_coeff, args.student_eval) == (1e5, 1.0, True)
    assert (args.prune_per_iter, args.group_size, args.interval_prune) == (32, 16, 100)
    assert (args.latency_regularization, flags.cost_targets(args.latency_target)) == (5e-4, (0.54,))
    assert args.kl_tau == 3 and args.pruning_lr == "constant" and args.qk_v_units == "shared"
    assert nvit_prune.prune_budget(args) == 39000 and args.distillation_type == "hard"
    assert args.teacher_path == ""  # DeiT's teacher through timm


def test_finetune_command_uses_the_reference_semantics():
    (cmd,) = [c for c in readme_commands("revit_scratch.py") if "--finetune" in c and "IMNET" in c]
    args = revit_scratch.get_args_parser().parse_args(cmd)
    assert args.finetune == "out/nvit_b" and args.student_eval is None  # eval mode: --finetune
    assert (args.kl_loss_coeff, args.distillation_tau, args.warmup_epochs) == (1e5, 20.0, 0)
    assert args.base_loss_head == "mean"


def test_revit_command():
    (cmd,) = [c for c in readme_commands("revit_scratch.py") if "--EMB" in c]
    args = revit_scratch.get_args_parser().parse_args(cmd)
    assert args.EMB == 176 and args.scratch and args.warmup_epochs == 5
    assert args.kl_loss_coeff == 0 and args.distillation_type == "hard"
    dims = revit_scratch.requested_dims(args)
    assert dims.token_scale and dims.attn_scale == [0.125] * 12 and dims.init == "torch_default"
