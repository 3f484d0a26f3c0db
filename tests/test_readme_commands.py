"""The README's reference commands (NViT-B pruning and finetuning, ReViT-T) parse as typed and
mean what the reference's meant; its test command is what CI runs, with a complete lock."""
from __future__ import annotations

import re
import shlex

import pytest


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


# ----------------------------------------------------------------- CI and the pinned toolchain
def _commands(text: str) -> list[list[str]]:
    joined = re.sub(r"\\\n\s*", " ", text)
    commands = (shlex.split(line, comments=True) for line in joined.splitlines())
    return [c for c in commands if c]


def _readme_test_block() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "pytest" in b]
    return _commands(block)


def test_ci_runs_the_readme_test_commands():
    """.ci/run installs what the README's test step installs and runs its test command word for
    word, so a user's run matches CI."""
    install, test = _readme_test_block()
    ci = _commands((ROOT / ".ci" / "run").read_text())
    assert test in ci
    quiet = {"--quiet", "--disable-pip-version-check"}
    ci_installs = [c[4:] for c in ci if c[:4] == ["python", "-m", "pip", "install"]]
    assert install[:2] == ["pip", "install"]
    assert install[2:] in [[w for w in c if w not in quiet] for c in ci_installs]
    assert "-c" in install and "requirements-lock.txt" in install


def _requirements(path) -> list:
    """The named requirements of a requirements file and the files it includes."""
    from packaging.requirements import Requirement
    out = []
    for line in (ROOT / path).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            out += _requirements(line[3:].strip())
        elif line:
            out.append(Requirement(line))
    return out


def test_the_lock_pins_every_requirement_within_its_range():
    """requirements-lock.txt holds one exact version of every package the test set names, and
    each one is inside the range users are given."""
    from packaging.utils import canonicalize_name
    from packaging.version import Version
    pins = {}
    for line in (ROOT / "requirements-lock.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = Version(version)
    for req in _requirements("requirements-test.txt"):
        pinned = pins.get(canonicalize_name(req.name))
        assert pinned is not None, f"{req.name} is not pinned in requirements-lock.txt"
        assert req.specifier.contains(pinned, prereleases=True), f"{req.name}=={pinned} not in {req}"


# ------------------------------------------------------------------ every page's commands
PAGES = ["README.md", "ARCHITECTURE.md", "benchmarks/README.md",
         *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
LAUNCHERS = {"torchrun", "srun"}


class _Parsed(Exception):
    pass


def _program(words: list[str]) -> tuple[str, list[str]] | None:
    """(module or script, its arguments) of a command that runs one of ours, else None."""
    for i, w in enumerate(words):
        if w.endswith(".py") and (ROOT / w).is_file() and not w.startswith("tests/"):
            return w.removesuffix(".py").replace("/", "."), words[i + 1:]
        if w == "-m" and i + 1 < len(words) and words[i + 1].startswith(("tools.", "benchmarks.")):
            return words[i + 1], words[i + 2:]
    return None


def page_commands() -> list[tuple[str, str, list[str]]]:
    """(page, program, arguments) of every command of ours in every page's bash blocks."""
    out = []
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", (ROOT / page).read_text(), re.S):
            for words in _commands(block):
                found = _program(words)
                if found and "..." not in found[1] and "bench_X" not in found[0]:
                    out.append((page, *found))
    return out


def test_every_page_has_its_commands_checked():
    pages = {page for page, _, _ in page_commands()}
    assert {"README.md", "docs/timm_family.md", "benchmarks/README.md"} <= pages
    programs = {program for _, program, _ in page_commands()}
    assert {"revit_scratch", "nvit_prune", "tools.build_latency_table", "tools.export"} <= programs


@pytest.mark.parametrize("page,program,argv", page_commands(),
                         ids=[f"{p}:{m}:{i}" for i, (p, m, _) in enumerate(page_commands())])
def test_every_command_in_every_page_parses(page, program, argv, monkeypatch):
    """The command's flags parse as its page writes them (with -c files read from the
    repository); nothing runs."""
    import argparse
    import importlib
    monkeypatch.chdir(ROOT)
    module = importlib.import_module(program)
    if hasattr(module, "get_args_parser"):
        module.get_args_parser().parse_args(argv)
        return
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(real(self, args, namespace))
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr("sys.argv", [program, *argv])
    with pytest.raises(_Parsed):
        module.parse_args(argv) if hasattr(module, "parse_args") else module.main()
