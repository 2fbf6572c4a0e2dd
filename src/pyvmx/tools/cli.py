"""The ``pyvmx`` command line.

Every user error (bad argument, unknown name, unreadable file) is one clear line on stderr and a
non-zero exit status; no tracebacks.
"""

from __future__ import annotations

import sys
from typing import NoReturn

import click
from rich.console import Console

import pyvmx

console = Console(highlight=False)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one clear line and exit with ``code``."""
    click.echo(f"pyvmx: error: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(pyvmx.__version__, prog_name="pyvmx")
def cli() -> None:
    """pyvmx: Intel VT-x in Python -- a software VMX machine and a KVM-style hypervisor."""


@cli.command()
@click.option(
    "--without",
    "without",
    multiple=True,
    metavar="CONTROL",
    help="Model a weaker CPU without this control (e.g. UNRESTRICTED_GUEST, VMX_PREEMPTION_TIMER).",
)
@click.option("--raw", is_flag=True, help="Print only the MSR values.")
def caps(without: tuple[str, ...], raw: bool) -> None:
    """Print the modelled CPU's VMX capability MSRs, decoded."""
    from pyvmx.tools import capsview

    try:
        profile = capsview.profile_without(without)
    except LookupError as exc:
        fail(str(exc.args[0]) if exc.args else str(exc))
    capsview.print_caps(console, profile, raw=raw)


@cli.group()
def vmcs() -> None:
    """VMCS field tables and dumps."""


@vmcs.command("fields")
@click.option("--type", "field_type", type=click.Choice(["control", "exit-info", "guest", "host"]), help="Only fields of this type.")
@click.option("--width", type=click.Choice(["16", "32", "64", "natural"]), help="Only fields of this width.")
@click.option("--grep", "pattern", metavar="TEXT", help="Only fields whose name contains TEXT.")
def vmcs_fields(field_type: str | None, width: str | None, pattern: str | None) -> None:
    """Print the VMCS field table (SDM Appendix B): name, encoding, width, type."""
    from pyvmx.tools import capsview

    shown = capsview.print_fields(console, field_type, width, pattern)
    if shown == 0:
        fail("no VMCS field matches", code=1)


@cli.command()
def demo() -> None:
    """Run the built-in guest and show which of its actions become VM exits."""
    from pyvmx.tools import demo as demo_module

    demo_module.print_demo(console)


def main(argv: list[str] | None = None) -> None:
    """Entry point: click's usage errors become one line on stderr, exit status 2."""
    try:
        rc = cli.main(args=argv, prog_name="pyvmx", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
        sys.exit(0)
    except click.UsageError as exc:
        fail(exc.format_message().replace("\n", " "))
    except click.Abort:
        fail("aborted", code=130)
    except KeyboardInterrupt:
        fail("interrupted", code=130)
    except click.ClickException as exc:
        fail(exc.format_message(), code=exc.exit_code)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
