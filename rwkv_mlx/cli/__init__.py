"""The ``rwkv-mlx`` command: one sub-command per module, one error line per failure.

Every ``RwkvMlxError`` becomes ``rwkv-mlx: error: <file>: <problem>`` on stderr
and the error's exit status (2 bad argument, 3 bad file, 4 unsupported model,
5 quality gate); an ``OSError`` (a path that cannot be created or written, a full
disk) is a file problem, status 3; an interrupt exits 130 (SIGTERM during a
conversion 143).  No traceback reaches the user for bad input.
"""

from __future__ import annotations

import sys

import typer

from ..errors import ModelFileError, RwkvMlxError

app = typer.Typer(
    name="rwkv-mlx",
    help="RWKV-7 world models on MLX: generate, chat, serve, convert, train, benchmark.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)



def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        from .. import __version__

        print(f"rwkv-mlx {__version__} (mlx {version('mlx')}, Python {sys.version.split()[0]})")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                 help="Print the versions of rwkv-mlx, MLX and Python and exit."),
) -> None:
    """RWKV-7 world models on MLX: generate, chat, serve, convert, train, benchmark."""


def _hide_flag_types() -> None:
    """Switches (--greedy, --chat, ...) take no value: typer >= 0.2x shows them as '<bool>', as if they took one."""
    try:
        from typer.core import TyperOption
    except ImportError:
        return
    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is not None:
        TyperOption.display_type_rich = lambda self, ctx: None if getattr(self, "is_flag", False) else shown(self, ctx)


_hide_flag_types()


def _register_commands() -> None:
    """Each module of this package defines its sub-command(s) with ``@app.command``."""
    import importlib
    import pkgutil

    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        if module != "common":
            importlib.import_module(f"{__name__}.{module}")


_register_commands()


# click's error base class (typer >= 0.20 vendors its own copy of click)
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _switch_given_a_value(e, args: list[str]) -> str | None:
    """'--greedy yes': a switch followed by a word click takes for a stray argument; say what happened."""
    ctx = getattr(e, "ctx", None)
    if ctx is None or "unexpected extra argument" not in e.format_message():
        return None
    switches = {name: p for p in ctx.command.params if getattr(p, "is_flag", False) for name in p.opts}
    for before, word in zip(args, args[1:]):
        if before in switches and not word.startswith("-"):
            off = switches[before].secondary_opts
            return (f"{before} is a switch and takes no value (got {word!r}): write {before} alone to turn it on"
                    f"{f', {off[0]} to turn it off' if off else ', leave it out to keep it off'}")
    return None


def run(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (tests call this)."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        code = app(args=args or ["--help"], prog_name="rwkv-mlx", standalone_mode=False)
    except _ClickException as e:  # unknown option, bad value: one line, like our own errors
        hint = f" (see '{e.ctx.command_path} --help')" if getattr(e, "ctx", None) else ""
        message = _switch_given_a_value(e, args) or " ".join(e.format_message().split())
        print(f"rwkv-mlx: error: {message}{hint}", file=sys.stderr)
        return e.exit_code
    except typer.Abort:
        print("\nrwkv-mlx: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except RwkvMlxError as e:
        print(f"rwkv-mlx: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # output piped into `head`: not an error
        return 0
    except OSError as e:  # disk full, permissions, a path that cannot be created: a file problem (status 3)
        where = f"{e.filename}: " if e.filename and str(e.filename) not in (e.strerror or "") else ""
        print(f"rwkv-mlx: error: {where}{e.strerror or e}", file=sys.stderr)
        return ModelFileError.exit_code
    except KeyboardInterrupt:
        print("\nrwkv-mlx: interrupted", file=sys.stderr)
        return 130
    if code == 130:  # typer turns Ctrl-C into a bare 130 (after a newline) when not standalone
        print("rwkv-mlx: interrupted", file=sys.stderr)
    return code if isinstance(code, int) else 0


def main() -> None:
    sys.exit(run())
