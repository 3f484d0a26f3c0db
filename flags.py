"""Command-line flags, in groups that each entry script assembles.

Each script's --help lists exactly the flags it honours. Flag names and defaults are DeiT's
(and the NViT reference's) unless docs/differences.md says
otherwise. `FLAG_OF_FIELD` is the one place where a field named by the library (models/,
pruning/) in an error is mapped to the flag that sets it.
"""
from __future__ import annotations

import argparse
import json
import numbers
import sys
from pathlib import Path

import torch
import yaml
from timm.utils import ParseKwargs

from atomic import write_text_atomic
from datasets import INAT_CATEGORIES
from errors import UserError
from losses import BASE_LOSS_HEADS, DISTILL_TARGETS, DISTILL_TOKENS, FEATURE_DISTANCES
from pruning import RUNTIMES

FLAG_OF_FIELD = {
    "name": "--model", "emb": "--EMB", "dims": "--dims/--EMB", "img_size": "--input-size",
    "global_pool": "--gp", "model_kwargs": "--gp/--model-kwargs", "ema": "--use-ema",
    "runtime": "--runtime",
    "patch_size": "--patch-size", "num_classes": "--data-set (its class count)",
    "distilled": "--model", "in_chans": "--model", "pretrained": "--pretrained (or --pretrained-path FILE)",
    "latency_table": "--latency_look_up_table", "cost": "--cost", "qkv_units": "--qk-v-units",
}


class Args(argparse.Namespace):
    """Parsed flags; `resolved` (kept out of vars(), so out of checkpoints' "args") holds every
    flag's value as parsed, before the run derives anything from them: OUTPUT_DIR/args.yaml."""

    __slots__ = ("resolved",)


CONFIG_FLAGS = ("-c", "--config")
ARGS_FILE = "args.yaml"  # in OUTPUT_DIR: the run's flags, readable by --config


class ModelKwargs(ParseKwargs):
    """timm's --model-kwargs KEY=VALUE ... (values read as Python literals), with a malformed
    pair a one-line error."""

    def __call__(self, parser, namespace, values, option_string=None):
        bad = [v for v in values if v and "=" not in v]
        if bad:
            parser.error(f"{option_string}: expected KEY=VALUE pairs, got {bad[0]!r}")
        super().__call__(parser, namespace, values, option_string)


class Parser(argparse.ArgumentParser):
    """argparse with the scripts' error style: one `error:` line and exit 2, not the usage
    block of ninety flags; no abbreviated flags (`--eval` must not mean `--eval-crop-ratio`).

    With `config`, `-c/--config FILE.yaml` (timm's convention) gives flag values as a YAML
    mapping (keys: flag names, `batch_size` or `batch-size`); flags on the command line win,
    an unknown key is an error naming it. The file's entries are read as if typed before the
    command line, so they pass the same type and range checks.
    """

    def __init__(self, description: str, config: bool = False) -> None:
        super().__init__(description=description, allow_abbrev=False)
        self.takes_config = config
        if config:
            self.add_argument(*CONFIG_FLAGS, default=None, metavar="FILE.yaml",
                              help="flag values from a YAML file (as OUTPUT_DIR/args.yaml holds "
                                   "them); flags on the command line override it")

    _reading_config: str | None = None  # the config file whose values are being checked

    def error(self, message: str):
        if self._reading_config is not None:
            message = f"--config {self._reading_config}: {message}"
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None) -> Args:
        argv = list(sys.argv[1:] if args is None else args)
        path = config_path(argv) if self.takes_config else None
        if path is not None:
            tokens = self.config_tokens(path)
            self._reading_config = path  # its values alone first: errors name the file
            try:
                super().parse_args(tokens, Args())
            finally:
                self._reading_config = None
            argv = tokens + argv
        parsed = super().parse_args(argv, Args() if namespace is None else namespace)
        if isinstance(parsed, Args):
            parsed.resolved = {a.dest: getattr(parsed, a.dest) for a in self._actions
                               if a.dest not in ("help", "config")}
        return parsed

    def config_tokens(self, path: str) -> list[str]:
        """The command-line tokens a config file stands for."""
        try:
            data = yaml.safe_load(Path(path).read_text())
        except OSError as e:
            self.error(f"--config {path}: cannot read it ({e.strerror})")
        except yaml.YAMLError as e:
            self.error(f"--config {path}: not valid YAML ({one_line_yaml(e)})")
        if data is None:
            return []
        if not isinstance(data, dict):
            self.error(f"--config {path}: expected a mapping of flag names to values, got "
                       f"{type(data).__name__}")
        by_dest: dict[str, list[argparse.Action]] = {}
        for action in self._actions:
            if action.dest not in ("help", "config"):
                by_dest.setdefault(action.dest, []).append(action)
        tokens = []
        for key, value in data.items():
            actions = by_dest.get(str(key).lstrip("-").replace("-", "_"))
            if not actions:
                self.error(f"--config {path}: unknown key {key!r} (not a flag of {self.prog})")
            try:
                tokens += flag_tokens(actions, value)
            except ValueError as e:
                self.error(f"--config {path}: {key}: {e}")
        return tokens


def config_path(argv: list[str]) -> str | None:
    """The value of the last -c/--config in a command line."""
    path = None
    for i, token in enumerate(argv):
        if token in CONFIG_FLAGS and i + 1 < len(argv):
            path = argv[i + 1]
        elif token.startswith("--config="):
            path = token.split("=", 1)[1]
        elif token.startswith("-c") and len(token) > 2 and not token.startswith("--"):
            path = token[2:]  # -cFILE, as argparse reads it
    return path


def one_line_yaml(e: Exception) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or e}{where}"


def flag_tokens(actions: list[argparse.Action], value) -> list[str]:
    """Command-line tokens that set one flag's destination to `value`."""
    def text(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return json.dumps(v) if isinstance(v, dict) else str(v)
    switches = [a for a in actions if a.nargs == 0]
    if value is None:
        return []  # the flag's default
    if isinstance(value, bool) and switches:
        for a in switches:
            if isinstance(a, argparse.BooleanOptionalAction):
                return [a.option_strings[0] if value else a.option_strings[-1]]
            if a.const is value:
                return [a.option_strings[-1]]
        if all(a.default == value for a in switches):
            return []
        raise ValueError(f"cannot be {text(value)} (no flag sets that)")
    action = next((a for a in actions if a.nargs != 0), None)
    if action is None:
        raise ValueError(f"expected true or false, got {value!r}")
    flag = action.option_strings[-1]
    if isinstance(value, dict) and isinstance(action, ParseKwargs):
        return [flag, *(f"{k}={v!r}" for k, v in value.items())]
    if action.nargs == "?" and value is True:
        return [flag]
    if isinstance(value, list):
        if action.nargs in (None, "?"):
            raise ValueError(f"expected one value, got a list {value}")
        return [flag, *map(text, value)]
    return [flag, text(value)]


def write_args_yaml(args: Args, path) -> None:
    """OUTPUT_DIR/args.yaml: every flag's value as parsed; `-c` on it repeats the run."""
    write_text_atomic(Path(path), yaml.safe_dump(plain(args.resolved), sort_keys=False))


def plain(value):
    """argparse values as plain scalars, lists and mappings: what YAML, JSON and
    torch.load(weights_only=True) accept (args.yaml, checkpoints' "args")."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):  # numpy's too: their pickles are not plain
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return str(value)


def user_message(e: Exception) -> str:
    """A user error as the scripts print it: the flag that sets the field at fault first."""
    flag = FLAG_OF_FIELD.get(getattr(e, "field", None) or "")
    return f"{flag}: {e}" if flag else str(e)


def tool_call(work, io: str = "read") -> tuple[int, object]:
    """(exit code, result) of a tool's work: a user error or a file it cannot `io` is one
    line on stderr and code 2, never a traceback (the tools' mains return the code)."""
    try:
        return 0, work()
    except UserError as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
    except OSError as e:
        print(f"error: cannot {io} {e.filename}: {e.strerror}", file=sys.stderr)
    return 2, None


def ranged(kind: type, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False):
    """An argparse type: `kind` (int or float) within [low, high] (open ends as asked), so a
    value out of range is a one-line parse error before anything runs."""
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    span = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value != value or (low is not None and (value < low or (low_open and value == low))) \
                or (high is not None and (value > high or (high_open and value == high))):
            raise argparse.ArgumentTypeError(f"must be in {span}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


POSITIVE_INT = ranged(int, 1)
COUNT = ranged(int, 0)  # zero allowed
NONNEG = ranged(float, 0.0)
POSITIVE = ranged(float, 0.0, low_open=True)
PROB = ranged(float, 0.0, 1.0)
RATE = ranged(float, 0.0, 1.0, high_open=True)  # dropout-like: 1 would drop everything


SCHEDULERS = ["constant", "cosine", "multistep", "plateau", "poly", "rsqrt", "step", "tanh"]
INTERPOLATIONS = ["random", "bilinear", "bicubic", "nearest", "box", "hamming", "lanczos"]


def optimizer_name(value: str) -> str:
    """--opt: a timm optimizer, optionally prefixed as timm allows (`lookahead_adamw`)."""
    from timm.optim import list_optimizers
    if value.lower().split("_")[-1] not in list_optimizers():
        raise argparse.ArgumentTypeError(f"{value!r} is not a timm optimizer (adamw, sgd, lamb, ...)")
    return value


def auto_augment(value: str) -> str:
    """--aa: a spec timm's transform factory accepts (checked by building it once)."""
    if value.strip().lower() in ("", "none"):
        return value
    from timm.data import create_transform
    try:
        create_transform(32, is_training=True, auto_augment=value)
    except Exception as e:  # timm asserts or raises KeyError/ValueError on a bad spec
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise argparse.ArgumentTypeError(f"{value!r} is not a timm auto-augment spec "
                                         f"(rand-m9-mstd0.5-inc1, augmix, v0, none): {detail}") from None
    return value


def str2bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "y"):
        return True
    if value.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def add_amp_dtype_arg(p) -> None:
    """--amp-dtype, shared by the scripts and tools/build_latency_table.py."""
    p.add_argument("--amp-dtype", default=None, choices=["float16", "bfloat16"],
                   help="autocast dtype (implies --amp; default: float16 on CUDA, bfloat16 on "
                        "the CPU); bfloat16 needs no grad scaler and has fp32's range")


def add_tf32_arg(p) -> None:
    """--tf32, shared by the scripts and tools/build_latency_table.py (a table is timed as the
    run computes)."""
    p.add_argument("--tf32", action="store_true",
                   help="TF32 tensor cores for fp32 matmuls and convolutions on CUDA (Ampere and "
                        "later: faster, 10-bit mantissa); default: PyTorch's (matmuls in full fp32)")


def add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--batch-size", default=64, type=POSITIVE_INT, help="per process")
    g.add_argument("--grad-accum-steps", default=1, type=POSITIVE_INT,
                   help="optimizer step every N batches (each process's effective batch is "
                        "N x --batch-size; the lr scaling and the prune interval count it)")
    g.add_argument("--epochs", default=300, type=COUNT)
    g.add_argument("--print-freq", default=50, type=POSITIVE_INT, help="progress line every N iterations")
    g.add_argument("--output_dir", "--output-dir", default="", help="where to save, empty for no saving")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--amp", action="store_true", help="fp16 autocast on CUDA, bf16 on the CPU")
    add_amp_dtype_arg(g)
    add_tf32_arg(g)
    g.add_argument("--torchcompile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the model for training, evaluation and pruning (bare "
                        "flag: inductor); the first steps then take a minute or more to compile")
    g.add_argument("--torchcompile-mode", default=None,
                   choices=["default", "reduce-overhead", "max-autotune",
                            "max-autotune-no-cudagraphs"],
                   help="torch.compile's mode (default: its default)")
    g.add_argument("--deterministic", action="store_true",
                   help="PyTorch's deterministic algorithms (CUDA runs then repeat bitwise on the "
                        "same machine and software, more slowly); CPU runs are bitwise without it")
    g.add_argument("--log-wandb", action="store_true",
                   help="also log the scalars to Weights & Biases (needs the wandb package)")
    g.add_argument("--wandb-project", default="nvit", help="the W&B project of --log-wandb")
    g.add_argument("--seed", default=0, type=int)
    g.add_argument("--dist-eval", action="store_true", help="shard evaluation over processes")
    g.add_argument("--num_workers", "--num-workers", default=10, type=COUNT)
    g.add_argument("--pin-mem", action="store_true")
    g.add_argument("--no-pin-mem", action="store_false", dest="pin_mem")
    p.set_defaults(pin_mem=True)
    g.add_argument("--dist_url", "--dist-url", default="env://")
    g.add_argument("--dist-timeout", default=30, type=POSITIVE,
                   help="minutes a collective waits for a process before the run fails (an "
                        "out-of-memory error on one GPU leaves the others waiting this long; "
                        "under srun add --kill-on-bad-exit=1, see docs/training.md)")
    g.add_argument("--local_rank", "--local-rank", default=0, type=int,
                   help="set by torch.distributed.launch without --use_env")


def add_model_args(p: argparse.ArgumentParser, widths: bool) -> None:
    """widths: the flags that choose the student's own dims (training from scratch)."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default="deit_base_distilled_patch16_224", type=str,
                   help="timm ViT name (DeiT, ViT, DeiT III, DINOv2: python -m tools.model_info "
                        "--families): fixes patch, image size, depth, distillation and family")
    if widths:
        g.add_argument("--EMB", default=None, type=POSITIVE_INT, help="embedding width of the ReViT rule")
        g.add_argument("--dims", default=None, type=str, help="YAML/JSON dims spec (overrides --EMB)")
        g.add_argument("--scratch", action="store_true",
                       help="random initial weights (with --finetune: keep its dims, drop its weights)")
    g.add_argument("--patch-size", default=None, type=POSITIVE_INT, help="override the name's patch size")
    g.add_argument("--input-size", default=None, type=POSITIVE_INT,
                   help="image size; default: the checkpoint's, else the dims file's, else the "
                        "--model name's (224 for *_224)")
    g.add_argument("--gp", default=None, metavar="POOL",
                   help="global pooling, as timm's train.py --gp: token or avg (default: the "
                        "model's; a checkpoint of timm's train.py says its own)")
    g.add_argument("--model-kwargs", nargs="*", default={}, action=ModelKwargs,
                   metavar="KEY=VALUE", help="timm model keyword arguments, as timm's train.py "
                                             "(fc_norm=True reg_tokens=4 init_values=1e-5 ...)")
    g.add_argument("--drop", default=0.0, type=RATE, help="dropout rate")
    g.add_argument("--attn-drop", default=0.0, type=RATE)
    g.add_argument("--drop-path", default=0.1, type=RATE)
    g.add_argument("--pretrained", action="store_true",
                   help="timm's pretrained weights of --model (the full model of the KL term; "
                        "the student's start too unless its dims are given)")
    g.add_argument("--pretrained-path", default="", type=str,
                   help="local timm/DeiT or nvit checkpoint used where --pretrained would download")


def add_ema_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("weight EMA")
    g.add_argument("--model-ema", action="store_true")
    g.add_argument("--no-model-ema", action="store_false", dest="model_ema")
    p.set_defaults(model_ema=True)
    g.add_argument("--model-ema-decay", type=PROB, default=0.99996)
    g.add_argument("--model-ema-force-cpu", action="store_true")
    g.add_argument("--use-ema", action="store_true",
                   help="--eval or --finetune the checkpoint's weight EMA instead of its model "
                        "weights (timm validate.py's flag)")
    g.add_argument("--best-on-ema", action="store_true",
                   help="choose best_checkpoint.pth by the EMA's top-1 (default: the model's, "
                        "as DeiT)")


def add_optimizer_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimizer")
    g.add_argument("--opt", default="adamw", type=optimizer_name, help="a timm optimizer name")
    g.add_argument("--opt-eps", default=1e-8, type=NONNEG)
    g.add_argument("--opt-betas", default=None, type=RATE, nargs="+")
    g.add_argument("--clip-grad", type=POSITIVE, default=None)
    g.add_argument("--clip-mode", type=str, default="norm", choices=["norm", "value"])
    g.add_argument("--momentum", type=RATE, default=0.9)
    g.add_argument("--weight-decay", type=NONNEG, default=0.05)
    g = p.add_argument_group("learning-rate schedule")
    g.add_argument("--sched", default="cosine", choices=SCHEDULERS)
    g.add_argument("--lr", type=NONNEG, default=5e-4, help="for a total batch of 512")
    g.add_argument("--unscale-lr", action="store_true", help="do not scale --lr by total batch / 512")
    g.add_argument("--lr-noise", type=NONNEG, nargs="+", default=None)
    g.add_argument("--lr-noise-pct", type=PROB, default=0.67)
    g.add_argument("--lr-noise-std", type=NONNEG, default=1.0)
    g.add_argument("--warmup-lr", type=NONNEG, default=1e-6)
    g.add_argument("--min-lr", type=NONNEG, default=1e-5)
    g.add_argument("--decay-epochs", type=POSITIVE, default=30)
    g.add_argument("--warmup-epochs", type=COUNT, default=0)
    g.add_argument("--cooldown-epochs", type=COUNT, default=10)
    g.add_argument("--patience-epochs", type=COUNT, default=10)
    g.add_argument("--decay-rate", "--dr", type=POSITIVE, default=0.1)


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data-path", default=None, type=str)
    g.add_argument("--data-set", default="IMNET", type=str.upper,
                   help="IMNET, FOLDER, CIFAR (= CIFAR10), CIFAR100, INAT, INAT19, DIGITS, or IMAGES "
                        "(every image under --data-path, no labels: --distill-target features)")
    g.add_argument("--inat-category", default="name", choices=INAT_CATEGORIES)
    g.add_argument("--skip-bad-images", action="store_true",
                   help="replace an unreadable image by the next good one and count it in the log, "
                        "instead of stopping (tools/check_data.py lists them all)")
    g.add_argument("--eval-crop-ratio", default=0.875, type=ranged(float, 0.0, 1.0, low_open=True))
    g = p.add_argument_group("augmentation")
    g.add_argument("--color-jitter", type=NONNEG, default=0.4)
    g.add_argument("--aa", type=auto_augment, default="rand-m9-mstd0.5-inc1",
                   help="timm auto-augment spec; 'none' disables")
    g.add_argument("--smoothing", type=RATE, default=0.1)
    g.add_argument("--train-interpolation", default="bicubic", choices=INTERPOLATIONS)
    g.add_argument("--hflip", type=PROB, default=0.5, help="horizontal flip probability (timm)")
    g.add_argument("--repeated-aug", action="store_true")
    g.add_argument("--no-repeated-aug", action="store_false", dest="repeated_aug")
    p.set_defaults(repeated_aug=True)
    g.add_argument("--reprob", type=PROB, default=0.25)
    g.add_argument("--remode", default="pixel", choices=["const", "rand", "pixel"],
                   help="random erasing fill (timm)")
    g.add_argument("--recount", type=POSITIVE_INT, default=1)
    g.add_argument("--mixup", type=NONNEG, default=0.8)
    g.add_argument("--cutmix", type=NONNEG, default=1.0)
    g.add_argument("--cutmix-minmax", type=ranged(float, 0.0, 1.0, low_open=True), nargs=2,
                   default=None)
    g.add_argument("--mixup-prob", type=PROB, default=1.0)
    g.add_argument("--mixup-switch-prob", type=PROB, default=0.5)
    g.add_argument("--mixup-mode", type=str, default="batch", choices=["batch", "pair", "elem"])


def add_loss_args(p: argparse.ArgumentParser, kl_loss_coeff: float, student_eval_help: str) -> None:
    """The DeiT loss, the CNN teacher and the KL term to the full model."""
    g = p.add_argument_group("losses and distillation")
    g.add_argument("--bce-loss", action="store_true")
    g.add_argument("--teacher-model", default="regnety_160", type=str)
    g.add_argument("--teacher-path", type=str, default="", help="file or URL of teacher weights")
    g.add_argument("--distillation-type", default="none", choices=["none", "soft", "hard"])
    g.add_argument("--distillation-alpha", default=0.5, type=PROB)
    g.add_argument("--distillation-tau", default=1.0, type=POSITIVE,
                   help="temperature of the soft teacher loss (and of the finetuning KL)")
    g.add_argument("--kl_loss_coeff", default=kl_loss_coeff, type=NONNEG,
                   help="weight of the KL divergence between the full pretrained --model and the "
                        "student (element-wise mean, as the reference)")
    g.add_argument("--original_loss_coeff", default=1.0, type=NONNEG, help="weight of the DeiT loss")
    g.add_argument("--base-loss-head", default="mean", choices=BASE_LOSS_HEADS,
                   help="the label loss on the mean of the two heads (the NViT reference) or on "
                        "the class head (DeiT)")
    g.add_argument("--student_eval", "--student-eval", default=None, type=str2bool,
                   help=student_eval_help)
    g.add_argument("--distill-target", default="logits", choices=DISTILL_TARGETS,
                   help="what the student matches in the full model: its logits (the KL term, "
                        "the reference's) or, label-free, its output features: then the loss is "
                        "--kl_loss_coeff x the feature distance alone, no label or teacher loss, "
                        "and the model is trained as a backbone (no classifier)")
    g.add_argument("--distill-loss", default="cosine", choices=FEATURE_DISTANCES,
                   help="the feature distance: 1 - cosine similarity, or mean squared error")
    g.add_argument("--distill-tokens", default="pooled", choices=DISTILL_TOKENS,
                   help="compare the pooled features, or add every patch token's distance")


def add_checkpoint_args(p: argparse.ArgumentParser, resume_help: str, finetune: bool) -> None:
    g = p.add_argument_group("checkpoints")
    g.add_argument("--resume", nargs="?", const="auto", default="", help=resume_help)
    if finetune:
        g.add_argument("--finetune", default="",
                       help="start from this checkpoint (its dims are used), or a folder holding "
                            "pruned_checkpoint.pth")
        g.add_argument("--start_epoch", default=0, type=COUNT)
        g.add_argument("--eval", action="store_true", help="evaluate the checkpoint, train nothing")


def add_runtime_arg(p, help: str) -> None:
    p.add_argument("--runtime", default="torch", choices=RUNTIMES, help=help + " (default torch)")


def add_pruning_args(p: argparse.ArgumentParser, pace: int, emb_saliency: tuple,
                     qkv_units: tuple) -> None:
    g = p.add_argument_group("pruning")
    g.add_argument("--pruning", action="store_true", help="prune (the reference's switch)")
    g.add_argument("--pruning_config", "--pruning-config", default="",
                   help="JSON: nvit's format (criterion, group_sizes, scales, momentum; "
                        "configs/nvit_reference.json) or an NViT reference config "
                        "(pruning_configs/group8_m23_m09.json)")
    g.add_argument("--prune_per_iter", "--prune-per-iter", default=1024, type=POSITIVE_INT,
                   help="each prune step removes prune_per_iter // group_size more groups")
    g.add_argument("--group_size", "--group-size", default=pace, type=POSITIVE_INT,
                   help="the divisor of --prune_per_iter and --prune_dict (the reference's; the "
                        "groups themselves are 16 channels, 2 heads, 8 QK, 8 V, 16 neurons)")
    g.add_argument("--interval_prune", "--interval-prune", default=100, type=POSITIVE_INT,
                   help="prune after iterations interval+1, 2*interval+1, ... (as the reference)")
    g.add_argument("--prune_dict", "--prune-dict", default='{"Global": 39000}',
                   help='JSON {"Global": N}: at most N // group_size groups removed, in at most '
                        'N // prune_per_iter + 1 prune steps')
    g.add_argument("--cost", default="latency", choices=["latency", "macs", "params"])
    g.add_argument("--latency_target", "--latency-target", default="0", type=cost_targets_text,
                   help="stop when cost <= target * cost of the original model (0: no target, "
                        "prune until the --prune_dict budget is spent); several, as "
                        "0.54,0.39,0.19: go on pruning after each and write pruned_<target>.pth "
                        "each time one is reached, and pareto.png")
    g.add_argument("--latency_regularization", "--latency-regularization", default=0.0,
                   type=NONNEG, help="lambda in score - lambda * cost drop (the paper: 5e-4)")
    g.add_argument("--latency_look_up_table", "--latency-look-up-table", default="",
                   help="JSON table from tools/build_latency_table.py (or the reference format)")
    g.add_argument("--pruning_exit", "--pruning-exit", action="store_true",
                   help="accepted for the reference's commands: the run always ends when pruning does")
    g.add_argument("--kl-tau", "--kl_tau", default=3.0, type=POSITIVE,
                   help="temperature of the KL term while pruning (the reference's fixed 3)")
    g.add_argument("--qk-v-units", default=qkv_units[0], choices=qkv_units,
                   help="a QK/V unit is one index shared by every head of a block (the reference) "
                        "or one (head, index) pair")
    g.add_argument("--unit-scales", default="config", choices=["config", "auto"],
                   help="the per-kind scales of the saliency: --pruning_config's (the "
                        "reference's 12, 12, 2, 2, 1 by default), or derived from the model and "
                        "--cost (docs/pruning.md, 'Unit scales')")
    g.add_argument("--emb-saliency", default=emb_saliency[0], choices=emb_saliency,
                   help="an embedding channel's score sums every weight it removes (full) or, as the "
                        "reference, leaves out tokens, position embedding and classifier columns")
    g.add_argument("--pruning-lr", default="constant", choices=["constant", "schedule"],
                   help="constant: the schedule's first learning rate throughout (the reference); "
                        "schedule: follow --sched/--warmup-epochs per epoch")
    g.add_argument("--token_scale", "--token-scale", default=True, type=str2bool,
                   help="give the student the reference's learnable token scale on q, k, v "
                        "(initialised to 1) if it has none")
    add_runtime_arg(g, "where the pruned model will run: a latency table must have been timed "
                       "there (tools/build_latency_table.py --runtime), and the end-of-run "
                       "speed report times there")
    g.add_argument("--speed-report-pairs", default=10, type=COUNT,
                   help="at the end, time the dense against the compact model in this many "
                        "interleaved pairs at --batch-size and report the speedup beside the "
                        "MACs/latency promise (tools/speed_report.py); 0: skip")
    g.add_argument("--save-every", default="10m", type=save_cadence_text,
                   help="write the resumable state every N prune steps (\"25\") or minutes "
                        "(\"10m\"), besides at each epoch's end, at the end and on a stop "
                        "(Ctrl-C / SIGTERM); \"0\": only those")


def save_cadence(value: str) -> tuple[int, float]:
    """--save-every: (prune steps, seconds); one of them is 0."""
    text = value.strip().lower()
    try:
        if text.endswith("m"):
            minutes = float(text[:-1])
            if minutes < 0:
                raise ValueError
            return 0, 60.0 * minutes
        steps = int(text)
        if steps < 0:
            raise ValueError
        return steps, 0.0
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of prune steps (25) or minutes (10m), got {value!r}") from None


def save_cadence_text(value: str) -> str:
    """--save-every is checked when parsed but kept as typed, so that args.yaml holds it as a
    user writes it; save_cadence reads it."""
    save_cadence(value)
    return value


_TARGET = ranged(float, 0.0, 1.0, high_open=True)


def cost_targets(value: str) -> tuple[float, ...]:
    """--latency_target: one cost ratio (0: none) or several separated by commas, returned
    from the largest down (the order the run reaches them)."""
    targets = sorted({_TARGET(t.strip()) for t in str(value).split(",")}, reverse=True)
    if len(targets) > 1 and targets[-1] == 0:
        raise argparse.ArgumentTypeError(f"0 means no target and cannot be one of several, "
                                         f"got {value!r}")
    return tuple(targets)


def cost_targets_text(value: str) -> str:
    """--latency_target is checked when parsed and kept as typed (args.yaml holds it as
    written, one number or a comma-separated list); cost_targets reads it."""
    cost_targets(value)
    return value
