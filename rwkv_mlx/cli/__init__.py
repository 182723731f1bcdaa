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


def run(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (tests call this)."""
    try:
        app(args=argv, prog_name="rwkv-mlx")  # standalone: usage errors print and exit 2
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except RwkvMlxError as e:
        print(f"rwkv-mlx: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # disk full, permissions, ...: the user's environment, not a bug
        print(f"rwkv-mlx: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nrwkv-mlx: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0


def main() -> None:
    sys.exit(run())
