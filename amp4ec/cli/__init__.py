"""The ``amp4ec`` command line: one group, one module per subcommand.

Every amp4ec error becomes one red line on stderr and exit code 2; Ctrl-C exits 130
after the subcommand has cleaned up what it started.

[Note: a clone's root on PYTHONPATH] With the folder above a clone on PYTHONPATH, the clone's
root (``amp4ec/``, no ``__init__.py``) is found as a namespace package ``amp4ec`` before an
editable install's finder is asked; its submodules still resolve through that finder, but
the package's own attributes (``__version__``) do not exist. The version then comes from the
installed distribution's metadata instead of an ImportError traceback.
"""

from __future__ import annotations

import os
import signal
import sys
from importlib.metadata import version
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.markup import escape

from amp4ec.allocator import keep_activation_memory
from amp4ec.cli.options import examples
from amp4ec.errors import Amp4ecError, one_line

try:
    from amp4ec import __version__
except ImportError:  # see [Note: a clone's root on PYTHONPATH]
    __version__ = version("amp4ec")

__all__ = ["cli", "main"]

err_console = Console(stderr=True)


def _error(message: str) -> NoReturn:
    """One red line on stderr (the message is text, not markup: ``amp4ec[bench]`` stays) and exit 2."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True, soft_wrap=True)
    sys.exit(2)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except Amp4ecError as exc:
            _error(str(exc))
        except click.UsageError as exc:  # a subcommand's flag click refused: one line too
            where = exc.ctx.command_path if exc.ctx else "amp4ec"
            _error(f"{exc.format_message()} (see {where} --help)")
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise  # click reports these itself
        except Exception as exc:  # a bug or an unforeseen failure: one line, the traceback on request
            if os.environ.get("AMP4EC_DEBUG"):
                raise
            _error(f"unexpected {type(exc).__name__}: {one_line(str(exc))} (AMP4EC_DEBUG=1 shows where)")
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted; everything started was stopped[/]")
            sys.exit(130)


@click.group(
    cls=_Group,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=examples(
        "amp4ec models                                  # the zoo",
        "amp4ec plan --model vit_b_16 --nodes 0.5:512M,0.5:512M,0.5:512M",
        "amp4ec run --model mobilenet_v2 --nodes 0.8,0.6 --requests 100",
    ),
)
@click.version_option(__version__, prog_name="amp4ec")
def cli() -> None:
    """Adaptive model partitioning for deep-learning inference on edge clusters."""


def _register() -> None:
    from amp4ec.cli import bench, infer, models, plan, run, serve

    cli.add_command(run.run)
    cli.add_command(plan.plan)
    cli.add_command(infer.infer)
    cli.add_command(bench.bench)
    cli.add_command(models.models)
    cli.add_command(serve.serve)


_register()


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM is Ctrl-C: handed to whatever handles SIGINT now. Inside ``asyncio.run`` that
    cancels the main task, so cleanup runs as tasks; a KeyboardInterrupt raised here instead
    could land inside a gRPC callback on the loop and leave the cleanup waiting forever."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:  # SIGINT ignored (a background job): SIGTERM still stops us
        raise KeyboardInterrupt


def main() -> None:
    # SIGTERM (kill, systemd, a CI timeout) cleans up like Ctrl-C: agents stopped, cgroups removed.
    signal.signal(signal.SIGTERM, _terminate)
    # Profiles and in-process forwards must time what the agents do: see [Note: activation page faults].
    keep_activation_memory()
    cli()
