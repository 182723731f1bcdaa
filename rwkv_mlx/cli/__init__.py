"""The ``rwkv-mlx`` command: one sub-command per module, one error line per failure.

Every ``RwkvMlxError`` becomes ``rwkv-mlx: error: <file>: <problem>`` on stderr
and the error's exit status (2 bad argument, 3 bad file, 4 unsupported model);
an interrupt exits 130.  No traceback reaches the user for bad input.
"""

from __future__ import annotations

import sys

import typer

from ..errors import RwkvMlxError

app = typer.Typer(
    name="rwkv-mlx",
    help="RWKV-7 world models on MLX: generate, convert, benchmark.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)



@app.callback()
def _root() -> None:
    """RWKV-7 world models on MLX: generate, convert, benchmark."""


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


def run(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (tests call this)."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        code = app(args=args or ["--help"], prog_name="rwkv-mlx", standalone_mode=False)
    except _ClickException as e:  # unknown option, bad value: one line, like our own errors
        hint = f" (see '{e.ctx.command_path} --help')" if getattr(e, "ctx", None) else ""
        print(f"rwkv-mlx: error: {' '.join(e.format_message().split())}{hint}", file=sys.stderr)
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
    except OSError as e:  # disk full, permissions, ...: the user's environment, not a bug
        print(f"rwkv-mlx: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nrwkv-mlx: interrupted", file=sys.stderr)
        return 130
    return code if isinstance(code, int) else 0


def main() -> None:
    sys.exit(run())
