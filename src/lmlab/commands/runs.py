"""`lmlab runs list|show|compare|delete|clean`: the runs under a runs folder."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lmlab.config import Config, load_config
from lmlab.errors import UserError
from lmlab.runs.catalog import (
    RunSummary,
    best_checkpoint,
    check_not_running,
    clean,
    clean_candidates,
    config_differences,
    delete_run,
    deletion_targets,
    disk_bytes,
    list_runs,
    resume_command,
    running_runs,
    summarize_run,
)
from lmlab.runs.checkpoint import read_meta
from lmlab.runs.folder import CONFIG_NAME, resolve_run

EPILOG = """examples:
  lmlab runs list
  lmlab runs show tiny                      # the newest run named tiny
  lmlab runs compare tiny/20261123-101500 tiny/20261124-090000
  lmlab runs delete tiny/20261123-101500 --keep-best
  lmlab runs clean --yes

RUN is a run folder, NAME/RUN_ID or RUN_ID under --runs-dir, or NAME (its newest run)."""


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--runs-dir", default="runs", metavar="DIR", help="where runs are (default: runs)"
    )
    parser = argparse.ArgumentParser(
        prog="lmlab runs",
        description="List, show, compare, delete and clean up training runs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(
        dest="action", required=True, metavar="{list,show,compare,delete,clean}"
    )

    def add(name: str, help: str, examples: list[str], note: str = "") -> argparse.ArgumentParser:
        epilog = "examples:\n" + "".join(f"  {line}\n" for line in examples) + note
        return sub.add_parser(
            name,
            help=help,
            description=help[0].upper() + help[1:] + ".",
            parents=[common],
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog=epilog.rstrip("\n"),
        )

    p = add(
        "list",
        "every run: status, steps, tokens, val loss, wall time, size, last checkpoint",
        ["lmlab runs list", "lmlab runs list tiny --runs-dir /data/runs", "lmlab runs list --json"],
    )
    p.add_argument("name", nargs="?", default=None, help="only the runs of this name")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = add(
        "show",
        "one run: config, metrics, checkpoints, status and the command to resume it",
        ["lmlab runs show tiny", "lmlab runs show runs/tiny/20261123-101500 --json"],
    )
    p.add_argument("run", metavar="RUN")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = add(
        "compare",
        "runs side by side: the config keys that differ and the final metrics",
        [
            "lmlab runs compare tiny/20261123-101500 tiny/20261124-090000",
            "lmlab runs compare 20261123-101500 20261124-090000 --json",
        ],
    )
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = add(
        "delete",
        "delete runs (never one that is running), or with --keep-best all their checkpoints "
        "but the best",
        ["lmlab runs delete tiny/20261123-101500", "lmlab runs delete tiny --keep-best --yes"],
        "\nIt lists what it removes and asks first; without a terminal, pass --yes.\n"
        "--keep-best keeps the checkpoint with the lowest val loss (or the newest), so a\n"
        "later --resume continues from that one.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.add_argument(
        "--keep-best",
        action="store_true",
        help="keep the run and its best checkpoint; delete its other checkpoints",
    )
    p.add_argument("--yes", "-y", action="store_true", help="do not ask")
    p = add(
        "clean",
        "remove temporary folders left by crashes and runs that never saved a checkpoint",
        ["lmlab runs clean", "lmlab runs clean --runs-dir /data/runs --yes"],
        "\nRunning runs are never touched. It lists what it removes and asks first;\n"
        "without a terminal, pass --yes.",
    )
    p.add_argument("--yes", "-y", action="store_true", help="do not ask")
    return parser


def main(argv: list[str]) -> int:
    """Run `lmlab runs ARGV...`; bad input raises UserError."""
    args = _parser().parse_args(argv)
    actions = {
        "list": _list,
        "show": _show,
        "compare": _compare,
        "delete": _delete,
        "clean": _clean,
    }
    return actions[args.action](args)


# -- list ---------------------------------------------------------------------------------


def _list(args: argparse.Namespace) -> int:
    summaries = list_runs(args.runs_dir, args.name)
    if args.json:
        print(json.dumps([s.to_dict() for s in summaries], indent=2))
        return 0
    if not summaries:
        where = Path(args.runs_dir) / args.name if args.name else Path(args.runs_dir)
        print(f"no runs under {where} (start one with `lmlab train --preset tiny --data DIR`)")
        return 0
    header = (
        "name",
        "run id",
        "status",
        "steps",
        "tokens",
        "best val",
        "last val",
        "wall",
        "disk",
        "last ckpt",
    )
    rows = [
        (
            s.name,
            s.run_id,
            s.status,
            _steps(s),
            _count(s.tokens_seen),
            _loss(s.best_val_loss),
            _loss(s.last_val_loss),
            _duration(s.wall_s),
            _size(s.disk_bytes),
            f"{s.checkpoints[-1].step:,}" if s.checkpoints else "-",
        )
        for s in summaries
    ]
    print(_table(header, rows, "lllrrrrrrr"))
    total = sum(s.disk_bytes for s in summaries)
    print(f"\n{len(summaries)} run(s), {_size(total)} on disk; `lmlab runs show RUN` for one run")
    return 0


# -- show ---------------------------------------------------------------------------------


def _show(args: argparse.Namespace) -> int:
    from lmlab.model.build import param_count  # imports torch: only for `show`

    run = resolve_run(args.run, args.runs_dir)
    summary = summarize_run(run)
    cfg = load_config(run / CONFIG_NAME)
    params = param_count(cfg.model)
    tokens_per_step = _tokens_per_step(summary, cfg)
    resumable = summary.status in ("interrupted", "failed") and bool(summary.checkpoints)
    if args.json:
        print(
            json.dumps(
                {
                    **summary.to_dict(),
                    "params": params,
                    "tokens_per_step": tokens_per_step,
                    "resume_command": resume_command(run) if resumable else None,
                    "config": cfg.to_dict(),
                },
                indent=2,
            )
        )
        return 0
    m, t = cfg.model, cfg.train
    note = f" ({summary.status_note})" if summary.status_note else ""
    rows = [
        ("run", str(run)),
        ("status", summary.status + note),
        (
            "model",
            f"{m.family}, {params:,} parameters, {m.n_layer} layers x {m.d_model} wide, "
            f"{m.n_head} heads, vocab {m.vocab_size:,}",
        ),
        (
            "training",
            f"seq len {cfg.seq_len}, micro-batch {t.micro_batch_size}, "
            f"{tokens_per_step:,} tokens/step, lr {t.lr:g} ({t.schedule}, "
            f"{t.warmup_steps:,} warmup), {t.max_steps:,} steps",
        ),
        ("data", cfg.data.path or "-"),
        (
            "progress",
            f"step {_steps(summary)}, {_count(summary.tokens_seen)} tokens, "
            f"wall {_duration(summary.wall_s)}",
        ),
        (
            "loss",
            f"train {_loss(summary.last_loss)} (last), val {_loss(summary.best_val_loss)} "
            f"(best) / {_loss(summary.last_val_loss)} (last)",
        ),
        ("disk", _size(summary.disk_bytes)),
    ]
    n = len(summary.checkpoints)
    size = _size(sum(c.disk_bytes for c in summary.checkpoints))
    rows.append(("checkpoints", f"{n}, {size}" if n else "none"))
    resume = ""  # last, where it is easy to copy
    if resumable:
        resume = resume_command(run)
    elif summary.status in ("interrupted", "failed"):
        resume = "not possible: it saved no checkpoint (`lmlab runs clean` removes it)"
    width = len("checkpoints")
    print("\n".join(f"{label.ljust(width)}  {value}" for label, value in rows))
    if summary.checkpoints:
        print(_checkpoint_table(summary))
    if resume:
        print(f"{'resume'.ljust(width)}  {resume}")
    return 0


def _tokens_per_step(summary: RunSummary, cfg: Config) -> int:
    """Measured from the newest checkpoint when there is one (it includes gradient
    accumulation and every process); else what the config asks for."""
    if summary.checkpoints:
        meta = read_meta(summary.path / "checkpoints" / summary.checkpoints[-1].name)
        if meta.get("step") and meta.get("tokens_seen"):
            return meta["tokens_seen"] // meta["step"]
    return cfg.train.tokens_per_step or cfg.train.micro_batch_size * cfg.seq_len


def _checkpoint_table(summary: RunSummary) -> str:
    best = best_checkpoint(summary.path)
    rows = [
        (
            c.name,
            f"{c.step:,}",
            _loss(c.val_loss),
            _size(c.disk_bytes),
            "best" if best is not None and best.name == c.name else "",
        )
        for c in summary.checkpoints
    ]
    table = _table(("checkpoint", "step", "val loss", "size", ""), rows, "lrrrl")
    return _indented(table)


# -- compare ------------------------------------------------------------------------------


def _compare(args: argparse.Namespace) -> int:
    runs = _resolve_all(args.runs, args.runs_dir)
    if len(runs) < 2:
        raise UserError("compare needs at least two different runs")
    configs = [load_config(run / CONFIG_NAME) for run in runs]
    differences = config_differences(configs)
    summaries = [summarize_run(run) for run in runs]
    if args.json:
        print(
            json.dumps(
                {
                    "runs": [str(run) for run in runs],
                    "config_differences": differences,
                    "summaries": [s.to_dict() for s in summaries],
                },
                indent=2,
            )
        )
        return 0
    header = ("", *(f"{s.name}/{s.run_id}" for s in summaries))
    rows: list[tuple[str, ...]] = [
        (key, *(_value(v) for v in values)) for key, values in differences.items()
    ]
    if not rows:
        rows.append(("config", *["identical"] * len(runs)))
    rows.append(("", *[""] * len(runs)))
    metrics = {
        "status": lambda s: s.status,
        "steps": _steps,
        "tokens": lambda s: _count(s.tokens_seen),
        "last train loss": lambda s: _loss(s.last_loss),
        "best val loss": lambda s: _loss(s.best_val_loss),
        "last val loss": lambda s: _loss(s.last_val_loss),
        "wall": lambda s: _duration(s.wall_s),
        "disk": lambda s: _size(s.disk_bytes),
    }
    rows += [(label, *(show(s) for s in summaries)) for label, show in metrics.items()]
    print(_table(header, rows, "l" + "r" * len(runs)))
    return 0


def _resolve_all(specs: list[str], runs_dir: str) -> list[Path]:
    """The runs named, each once however it was named."""
    runs = {}
    for spec in specs:
        run = resolve_run(spec, runs_dir)
        runs.setdefault(run.resolve(), run)
    return list(runs.values())


def _value(value: Any) -> str:
    return "-" if value is None else str(value)


# -- delete and clean ---------------------------------------------------------------------


def _delete(args: argparse.Namespace) -> int:
    runs = _resolve_all(args.runs, args.runs_dir)
    for run in runs:
        check_not_running(run)  # refuse before deleting any
    targets = {run: deletion_targets(run, args.keep_best) for run in runs}
    rows = [(str(path), _size(disk_bytes(path))) for paths in targets.values() for path in paths]
    if not rows:
        print("nothing to delete: no checkpoint besides the best")
        return 0
    print("to delete:")
    print(_indented(_table(None, rows, "lr")))
    for run, paths in targets.items():
        if args.keep_best and paths:
            print(f"keeping {best_checkpoint(run)} and the run's config and metrics")
    total = sum(disk_bytes(path) for paths in targets.values() for path in paths)
    if not _confirm(f"delete {len(rows)} folder(s), {_size(total)}?", args.yes):
        print("nothing deleted")
        return 1
    freed = sum(delete_run(run, args.keep_best) for run in runs)
    print(f"deleted {len(rows)} folder(s), freed {_size(freed)}")
    return 0


def _clean(args: argparse.Namespace) -> int:
    items = clean_candidates(args.runs_dir)
    running = running_runs(args.runs_dir)
    if running:
        print(f"skipping {len(running)} running run(s): {', '.join(str(r) for r in running)}")
    if not items:
        print(f"nothing to clean under {args.runs_dir}")
        return 0
    print("to remove:")
    rows = [(str(item.path), _size(item.disk_bytes), item.reason) for item in items]
    print(_indented(_table(None, rows, "lrl")))
    total = sum(item.disk_bytes for item in items)
    if not _confirm(f"remove {len(items)} item(s), {_size(total)}?", args.yes):
        print("nothing removed")
        return 1
    print(f"removed {len(items)} item(s), freed {_size(clean(items))}")
    return 0


def _confirm(question: str, yes: bool) -> bool:
    """--yes, or a "y" typed at a terminal; without a terminal, refuse in one line."""
    if yes:
        return True
    if not sys.stdin.isatty():
        raise UserError("stdin is not a terminal, so nobody can confirm: pass --yes to go ahead")
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


# -- formatting ---------------------------------------------------------------------------


def _table(header: tuple[str, ...] | None, rows: list[tuple[str, ...]], align: str) -> str:
    """Columns padded to their widest cell; align has one 'l' or 'r' per column."""
    lines = [header, *rows] if header else rows
    widths = [max(len(line[i]) for line in lines) for i in range(len(align))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) if side == "l" else cell.rjust(width)
            for cell, width, side in zip(line, widths, align, strict=True)
        ).rstrip()
        for line in lines
    )


def _indented(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def _steps(summary: RunSummary) -> str:
    planned = f"{summary.steps_planned:,}" if summary.steps_planned is not None else "?"
    return f"{summary.steps_done:,}/{planned}"


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _count(n: int | None) -> str:
    """1234567 -> 1.23M."""
    if n is None:
        return "-"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _size(n_bytes: int) -> str:
    """1536 -> 1.5 KiB."""
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{n_bytes} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _duration(seconds: float) -> str:
    """3725 -> 1:02:05; 65 -> 1:05."""
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
