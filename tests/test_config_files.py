"""-c/--config FILE.yaml (timm's convention) and OUTPUT_DIR/args.yaml, for both scripts."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import flags
import nvit_prune
import revit_scratch
from helpers import ROOT, run_script

RUNS = ROOT / "configs" / "runs"
SCRIPTS = {"revit_scratch.py": revit_scratch, "nvit_prune.py": nvit_prune}


def parse(script, *argv):
    return script.get_args_parser().parse_args([str(a) for a in argv])


def write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_config_values_are_defaults_and_flags_win(tmp_path):
    config = write(tmp_path / "c.yaml", {"lr": 3e-4, "batch-size": 16, "model_ema": False,
                                         "opt_betas": [0.9, 0.95], "amp": True, "drop": None,
                                         "resume": True})
    args = parse(revit_scratch, "-c", config, "--batch-size", "8")
    assert args.lr == 3e-4 and args.batch_size == 8  # the command line wins
    assert args.model_ema is False and args.amp is True and args.opt_betas == [0.9, 0.95]
    assert args.drop == 0.0 and args.resume == "auto"  # null: the default; true: the bare flag
    assert args.epochs == 300 and args.config == str(config)  # untouched flags keep defaults
    assert parse(revit_scratch).lr == parse(revit_scratch, "-c", write(tmp_path / "e.yaml", "")).lr
    for spelling in ([f"--config={config}"], [f"-c{config}"], ["--config", config]):
        assert parse(revit_scratch, *spelling).lr == 3e-4, spelling


@pytest.mark.parametrize("content,words", [
    ({"lr": 1e-3, "learning_rate": 1e-3}, ["unknown key 'learning_rate'"]),
    ({"epochs": -3}, ["--epochs", "must be in [0, inf], got -3"]),
    ({"smoothing": [0.1, 0.2]}, ["smoothing: expected one value"]),
    ({"config": "other.yaml"}, ["unknown key 'config'"]),
    ("- lr\n- 1e-3\n", ["expected a mapping of flag names to values, got list"]),
    ("lr: [1e-3\n", ["not valid YAML"]),
    (None, ["cannot read it"]),
])
def test_bad_config_is_one_line_naming_the_file(tmp_path, capsys, content, words):
    path = tmp_path / "c.yaml"
    if content is not None:
        write(path, content)
    with pytest.raises(SystemExit) as e:
        parse(revit_scratch, "-c", path)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: --config {path}: "), err
    for w in words:
        assert w in err, err


@pytest.mark.parametrize("name", SCRIPTS)
def test_args_yaml_round_trip(tmp_path, name):
    """-c on a written args.yaml gives back the same flags, whatever their kinds."""
    script = SCRIPTS[name]
    argv = ["--data-set", "DIGITS", "--lr", "3e-4", "--resume", "--opt-betas", "0.9", "0.95",
            "--amp", "--cutmix-minmax", "0.2", "0.8", "--student_eval", "false"]
    if name == "nvit_prune.py":
        argv += ["--prune_dict", '{"Global": 500}', "--save-every", "25", "--pruning"]
    else:
        argv += ["--no-model-ema", "--EMB", "176"]
    args = parse(script, *argv)
    flags.write_args_yaml(args, tmp_path / "args.yaml")
    again = parse(script, "-c", tmp_path / "args.yaml")
    assert again.resolved == args.resolved
    assert vars(again) == {**vars(args), "config": str(tmp_path / "args.yaml")}
    assert "resolved" not in vars(args)  # kept out of checkpoints' "args"


def test_plain_values_load_without_unpickling(tmp_path):
    """flags.plain turns numpy numbers (a latency table's values) into Python's, so a
    checkpoint holding them still loads with weights_only=True."""
    import numpy as np
    value = flags.plain({"a": np.float64(1.5), "b": [np.int64(3), (True, None)], "c": Path("x")})
    assert value == {"a": 1.5, "b": [3, [True, None]], "c": "x"}
    assert type(value["a"]) is float and type(value["b"][0]) is int
    torch.save(value, tmp_path / "v.pth")
    assert torch.load(tmp_path / "v.pth", weights_only=True) == value


def script_of(config: Path):
    return nvit_prune if "prune" in config.stem else revit_scratch


@pytest.mark.parametrize("config", sorted(RUNS.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_parse(config, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = parse(script_of(config), "-c", config)
    assert args.config == str(config)


def test_paper_configs_are_the_reference_commands(monkeypatch):
    """NViT-B/H/S/T differ in their latency target only (the paper's 0.54/0.50/0.39/0.19);
    NViT-B's and ReViT-T's configs give what the README's reference commands give."""
    from test_readme_commands import readme_commands
    monkeypatch.chdir(ROOT)
    prune = {n: parse(nvit_prune, "-c", RUNS / f"nvit_{n}_prune.yaml").resolved for n in "bhst"}
    assert {n: flags.cost_targets(r.pop("latency_target")) for n, r in prune.items()} == \
        {"b": (0.54,), "h": (0.50,), "s": (0.39,), "t": (0.19,)}
    assert all(r == prune["b"] for r in prune.values())
    place = {"data_path", "output_dir", "latency_target"}  # given on the command line

    def same(config: Path, script, command: list[str]) -> None:
        a, b = parse(script, "-c", config).resolved, parse(script, *command).resolved
        assert {k: v for k, v in a.items() if k not in place} == \
            {k: v for k, v in b.items() if k not in place}
    (b_cmd,) = [c for c in readme_commands("nvit_prune.py") if "IMNET" in c]
    same(RUNS / "nvit_b_prune.yaml", nvit_prune, b_cmd)
    (t_cmd,) = [c for c in readme_commands("revit_scratch.py") if "--EMB" in c]
    same(RUNS / "revit_tiny.yaml", revit_scratch, t_cmd)
    (ft_cmd,) = [c for c in readme_commands("revit_scratch.py") if "--finetune" in c and "IMNET" in c]
    a = parse(revit_scratch, "-c", RUNS / "nvit_finetune.yaml", "--finetune", "out/nvit_b")
    assert {k: v for k, v in a.resolved.items() if k not in place} == \
        {k: v for k, v in parse(revit_scratch, *ft_cmd).resolved.items() if k not in place}


@pytest.mark.slow
def test_a_run_repeats_from_its_args_yaml(tmp_path, monkeypatch):
    """The README's training demo config (one epoch here) writes args.yaml; `-c` on it into
    another folder ends with the same weights."""
    monkeypatch.chdir(ROOT)  # the config names its dims file relative to the repository
    first, second = tmp_path / "a", tmp_path / "b"
    run_script("revit_scratch", ["-c", RUNS / "digits_train.yaml", "--epochs", "1",
                                 "--num_workers", "0", "--output_dir", first])
    recorded = yaml.safe_load((first / flags.ARGS_FILE).read_text())
    assert recorded["epochs"] == 1 and recorded["dims"] == "configs/revit_digits.yaml"
    run_script("revit_scratch", ["-c", first / flags.ARGS_FILE, "--output_dir", second])
    a, b = (torch.load(d / "checkpoint.pth", weights_only=True)["model"] for d in (first, second))
    assert all(torch.equal(a[k], b[k]) for k in a)
