"""The `lamemo` command: one entry point, one subcommand per job.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`;
modules import heavy dependencies (torch, deepspeed) inside `run`, so `lamemo --help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from .config.errors import EXIT_USER_ERROR

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "model-info": ("lamemo_ds.commands.model_info",
                   "parameters, FLOPs per token and memory-state size of a config"),
    "plan": ("lamemo_ds.commands.plan",
             "estimate memory, step time and communication of a cluster layout"),
    "prepare": ("lamemo_ds.commands.prepare",
                "tokenize a corpus into document-ordered webdataset shards"),
    "train": ("lamemo_ds.commands.train",
              "train with DeepSpeed (torchrun, deepspeed, mpirun, srun)"),
    "convert": ("lamemo_ds.commands.convert", "convert checkpoints (deepspeed, consolidated, hf, "
                "reference)"),
    "inspect": ("lamemo_ds.commands.inspect", "what a checkpoint holds (step, layout, pipeline "
                "map, tensors, manifest), without loading a model"),
    "verify": ("lamemo_ds.commands.verify", "check that a checkpoint or export folder is "
               "complete, intact and loadable"),
    "eval": ("lamemo_ds.commands.eval", "perplexity / bits per character of an exported model"),
    "generate": ("lamemo_ds.commands.generate", "sample text from an exported model"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lamemo", description="Pretrain LaMemo language models with DeepSpeed.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `lamemo COMMAND --help` for the options of one command.")
    # the deepspeed launcher passes --local_rank before the subcommand (LOCAL_RANK is read instead)
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def _run(run, args, name: str) -> int:
    """run(args) as the exit code (see `_exit_code`). Under mpirun a failing rank ends the whole
    job with its code, where it would otherwise leave the other ranks waiting for it."""
    try:
        code = _exit_code(run, args, name)
    except SystemExit as e:
        if e.code:
            _end_mpi_job(e.code if isinstance(e.code, int) else 1)
        raise
    except BaseException:
        # MPI_Abort ends the process before Python would print the traceback: print it first
        _end_mpi_job(1, last_words=traceback.print_exc)
        raise
    if code:
        _end_mpi_job(code)
    return code


def _end_mpi_job(code: int, last_words=None) -> None:
    if "mpi4py.MPI" in sys.modules:  # imported only by an mpirun rank (parallel.dist.discover)
        from .parallel.dist import abort_mpi_job

        abort_mpi_job(code, last_words=last_words)


def _exit_code(run, args, name: str) -> int:
    """run(args) as the exit code; a configuration or other user error, or a checkpoint file that
    would run code when loaded (refused unless --trust-checkpoint), is reported in one line
    (exit 2)."""
    from .checkpoint.safe_load import UntrustedCheckpointError, trusting
    from .config.errors import UserError
    from .config.schema import ConfigError

    try:
        with trusting(getattr(args, "trust_checkpoint", False)):
            return int(run(args) or 0)
    except ConfigError as e:
        print(f"{name}: config error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except UntrustedCheckpointError as e:
        print(f"{name}: refused: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except UserError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USER_ERROR
    return _run(args._run, args, f"lamemo {args.command}")


def standalone(command: str, prog: str, argv: list[str] | None = None) -> int:
    """Run subcommand `command` as its own program `prog` (the programs in tools/): the same
    options and code as `lamemo COMMAND`."""
    module, help_text = COMMANDS[command]
    mod = importlib.import_module(module)
    p = argparse.ArgumentParser(prog=prog, description=f"{help_text} (the same program as "
                                f"`lamemo {command}`)")
    mod.add_arguments(p)
    return _run(mod.run, p.parse_args(argv), prog)


if __name__ == "__main__":
    sys.exit(main())
