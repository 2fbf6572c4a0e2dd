"""The ``pyvmx`` command line.

Every user error (bad argument, unknown name, unreadable file) is one clear line on stderr and a
non-zero exit status; no tracebacks.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
from rich.console import Console

import pyvmx
from pyvmx.tools.inputs import InputError

if TYPE_CHECKING:
    from pyvmx.tools.runloop import ExitHandler
    from pyvmx.tools.trace import TraceEvent


def make_console(*, stderr: bool = False) -> Console:
    """A rich console for stdout (or stderr).  Written to a pipe or a file, nothing is wrapped
    at 80 columns: each message stays one line and a table keeps its natural width."""
    probe = Console(stderr=stderr)
    if probe.is_terminal:
        return Console(highlight=False, stderr=stderr)
    return Console(highlight=False, stderr=stderr, soft_wrap=True, width=100_000)


MAX_MEMORY_MIB = 1024  # = pyvmx.tools.run.MAX_MEMORY_MIB (a test checks; not imported: --help stays fast)
MAX_VCPUS = 8  # = pyvmx.tools.run.MAX_VCPUS


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
    capsview.print_caps(make_console(), profile, raw=raw)


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

    shown = capsview.print_fields(make_console(), field_type, width, pattern)
    if shown == 0:
        fail("no VMCS field matches", code=1)


@vmcs.command("dump")
@click.option("--example", "example", type=click.Choice(["long", "protected", "real"]), help="Dump a VMCS the sandbox sets up for a guest in this mode (default: long).")
@click.option("--from", "from_file", metavar="FILE", help="Dump a VMCS saved as JSON (see --save).")
@click.option("--save", "save_file", metavar="FILE", help="Also save the VMCS as JSON to FILE.")
@click.option("--no-run", is_flag=True, help="With --example: dump before VMLAUNCH (no exit information yet).")
def vmcs_dump(example: str | None, from_file: str | None, save_file: str | None, no_run: bool) -> None:
    """Print a VMCS area by area, as Linux's dump_vmcs() does, with controls and exit decoded."""
    from pyvmx.tools import vmcs_dump as vd
    from pyvmx.vmx.vmcs_dump import dump_vmcs

    if example is not None and from_file is not None:
        fail("give either --example or --from, not both")
    try:
        reader = vd.load_vmcs(from_file) if from_file is not None else vd.example_vmcs(example or "long", run=not no_run)
    except vd.VmcsFileError as exc:
        fail(str(exc))
    title = f"VMCS from {from_file}" if from_file else f"VMCS of the {example or 'long'}-mode example guest"
    click.echo(dump_vmcs(reader, title=title), nl=False)
    if save_file is not None:
        try:
            vd.save_vmcs(reader, save_file)
        except OSError as exc:
            fail(f"cannot write {save_file}: {exc.strerror or exc}")


@cli.group()
def trace() -> None:
    """Read traces written by --trace (JSON lines)."""


def _read_trace(path: str) -> list[TraceEvent]:
    from pyvmx.tools.trace import TraceFileError, read_jsonl

    try:
        return read_jsonl(path)
    except TraceFileError as exc:
        fail(str(exc))


@trace.command("show")
@click.argument("file")
@click.option("--reason", metavar="NAME", help="Only exits with this reason (name or number, e.g. IO_INSTRUCTION, hlt, 30).")
@click.option("--vcpu", type=click.IntRange(min=0), help="Only this vCPU.")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many events.")
@click.option("--entries", is_flag=True, help="Show VM entries too.")
def trace_show(file: str, reason: str | None, vcpu: int | None, limit: int | None, entries: bool) -> None:
    """Print a saved JSONL trace as a table, filtered."""
    from pyvmx.arch.msr import UnknownNameError
    from pyvmx.tools.trace import filter_events, format_table

    events = _read_trace(file)
    try:
        shown = filter_events(events, reason=reason, vcpu=vcpu, kind=None if entries else "exit", limit=limit)
    except UnknownNameError as exc:
        fail(str(exc))
    click.echo(format_table(shown), nl=False)  # no match: the header alone, as grep prints nothing


@trace.command("stats")
@click.argument("file")
@click.option("--metric", type=click.Choice(["guest", "handler"]), default="guest", show_default=True, help="guest: TSC ticks the guest ran before each exit; handler: host ns in the handler.")
@click.option("--plain", is_flag=True, help="Plain text instead of a table.")
def trace_stats(file: str, metric: str, plain: bool) -> None:
    """kvm_stat / perf kvm stat report table of a saved trace."""
    from pyvmx.tools.stats import ExitStats

    stats = ExitStats.from_events(_read_trace(file), metric="handler" if metric == "handler" else "guest")
    if stats.total_samples == 0:
        fail("the trace has no exits", code=1)
    if plain:
        click.echo(stats.render_text(), nl=False)
    else:
        make_console().print(stats.table())


@cli.command()
@click.argument("files", nargs=-1, required=True)
@click.option("--trace", "trace_file", metavar="FILE.jsonl", help="Write the exits as JSON lines to FILE.jsonl and a Perfetto/Chrome timeline to FILE.json.")
@click.option("--stats", "show_stats", is_flag=True, help="Print a kvm_stat-style table of the exits.")
@click.option("--record", "record_file", metavar="FILE", help="Record the run (one scenario) for 'pyvmx replay'.")
@click.option("--timeout", type=click.FloatRange(min=0), default=60.0, show_default=True, metavar="SECONDS", help="Wall-clock limit per scenario (0: none).")
@click.option("-v", "--verbose", is_flag=True, help="List every exit of each scenario.")
@click.option("--allow-outside-sources", is_flag=True, help="Let a scenario's source_file lie outside the scenario's directory.")
def check(files: tuple[str, ...], trace_file: str | None, show_stats: bool, record_file: str | None, timeout: float, verbose: bool,
          allow_outside_sources: bool) -> None:
    """Run scenario files (TOML) on the VT-x machine and check the VM exits they expect."""
    from pyvmx.tools.replay import Recorder
    from pyvmx.tools.scenario import ScenarioError, load_scenario, run_scenario, summarize
    from pyvmx.tools.stats import ExitStats
    from pyvmx.tools.trace import Tracer, describe_trace_files

    scenarios = []
    unreadable = 0
    for f in files:  # a bad file is reported and the others still run
        try:
            scenarios.append(load_scenario(f, allow_outside_sources=allow_outside_sources))
        except ScenarioError as exc:
            click.echo(f"pyvmx: error: {exc}", err=True)
            unreadable += 1
    if record_file is not None and len(files) != 1:
        fail("--record records one scenario: give exactly one file")
    if not scenarios:
        sys.exit(2)
    tracer = Tracer() if trace_file is not None else None
    stats = ExitStats() if show_stats else None
    recorder = Recorder(scenarios[0].record_config()) if record_file is not None else None
    failed = 0
    for index, sc in enumerate(scenarios):
        if tracer is not None:
            tracer.set_vm(index, sc.label)

        def wrap(handler: ExitHandler) -> ExitHandler:
            if stats is not None:
                handler = stats.wrap(handler)
            if tracer is not None:
                handler = tracer.wrap(handler)
            if recorder is not None:
                handler = recorder.wrap(handler)
            return handler

        result = run_scenario(sc, wrap=wrap, timeout=timeout)
        failed += not result.passed
        click.echo(summarize(result))
        if verbose:
            for line in result.exits:
                click.echo(f"      exit: {line}")
            if result.output:
                click.echo(f"      output: {result.output!r}")
    click.echo(f"{len(scenarios) - failed} passed, {failed} failed" + (f", {unreadable} not readable" if unreadable else ""))
    try:
        if tracer is not None and trace_file is not None:
            click.echo(describe_trace_files(tracer.write(trace_file)))
        if recorder is not None and record_file is not None:
            recorder.save(record_file)
            click.echo(f"record: {record_file}")
    except OSError as exc:
        fail(f"cannot write {exc.filename}: {exc.strerror or exc}")
    if stats is not None and stats.total_samples:
        make_console().print(stats.table())
    if unreadable:
        sys.exit(2)
    if failed:
        sys.exit(1)


@cli.command()
@click.argument("file")
def replay(file: str) -> None:
    """Re-run a recorded run (run --record, check --record) and compare its VM exits."""
    from pyvmx.tools.replay import RecordError, load_record
    from pyvmx.tools.replay import replay as do_replay

    try:
        result = do_replay(load_record(file))
    except RecordError as exc:
        fail(str(exc))
    n = len(result.exits)
    if result.identical:
        click.echo(f"identical: {n} exit{'s' if n != 1 else ''} replayed as recorded")
        return
    click.echo(f"pyvmx: replay diverged: {result.difference}", err=True)
    sys.exit(1)


@cli.command()
@click.argument("file")
@click.option("--port", type=int, default=1234, show_default=True, help="TCP port on 127.0.0.1 (0: any free port).")
@click.option("--step-with", type=click.Choice(["tf", "mtf"]), default="tf", show_default=True, help="Single step with RFLAGS.TF + #DB intercept, or the monitor trap flag.")
@click.option("--allow-outside-sources", is_flag=True, help="Let the scenario's source_file lie outside the scenario's directory.")
def gdbserver(file: str, port: int, step_with: str, allow_outside_sources: bool) -> None:
    """Serve a scenario's guest to gdb (remote serial protocol) until gdb detaches or kills it."""
    from pyvmx.tools.gdbstub import GdbStub, GdbStubError, SandboxTarget
    from pyvmx.tools.run import ASSEMBLY_SUFFIXES
    from pyvmx.tools.scenario import ScenarioError, build_sandbox, load_scenario

    if Path(file).suffix in ASSEMBLY_SUFFIXES + (".elf", ".bin", ".img"):
        fail(f"{file}: gdbserver serves a scenario file (.toml); to debug a guest image run: pyvmx run {file} --gdb {port}")
    try:
        sc = load_scenario(file, allow_outside_sources=allow_outside_sources)
        target = SandboxTarget(build_sandbox(sc), step_with=step_with)
        stub = GdbStub(target, port=port)
    except (ScenarioError, GdbStubError) as exc:
        fail(str(exc.args[-1]) if isinstance(exc, GdbStubError) else str(exc))
    except ValueError as exc:  # the guest does not assemble: the message names the file and line
        fail(f"cannot set up the guest: {str(exc).strip().splitlines()[0]}")
    click.echo(f"pyvmx gdbserver: {sc.label} ({sc.mode} mode) listening on {stub.host}:{stub.port}", err=True)
    click.echo(f"  gdb -ex 'target remote :{stub.port}'", err=True)
    stub.serve()


@cli.command()
def demo() -> None:
    """Run the built-in guest and show which of its actions become VM exits."""
    from pyvmx.tools import demo as demo_module

    demo_module.print_demo(make_console())


def _run_with_progress(runner: Any, options: Any, err_console: Console) -> Any:
    """A long run shows how much of its guest-TSC budget it has used (rich, on a terminal)."""
    from rich.progress import BarColumn, Progress, TextColumn

    with Progress(TextColumn("guest TSC"), BarColumn(), TextColumn("{task.completed:,} / {task.total:,}"),
                  console=err_console, transient=True) as progress:
        task = progress.add_task("run", total=options.max_tsc)
        return runner.run(options, on_progress=lambda used: progress.update(task, completed=used))


@cli.command("run")
@click.argument("image", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--memory", "memory_mib", type=click.IntRange(1, MAX_MEMORY_MIB), default=16, show_default=True, help="Guest RAM in MiB (and no more than this host can back).")
@click.option("--vcpus", type=click.IntRange(1, MAX_VCPUS), default=1, show_default=True, help="Number of vCPUs (all start at the entry point).")
@click.option("--pcpus", type=click.IntRange(1, MAX_VCPUS), default=1, show_default=True, help="Physical CPUs the vCPUs are scheduled on.")
@click.option("--mode", type=click.Choice(["real", "protected", "long"]), default="long", show_default=True, help="CPU mode at the entry point.")
@click.option("--load-address", type=str, default=None, help="Guest-physical load address of a flat image or source (default 0x8000 real, 0x10000 otherwise).")
@click.option("--entry", default=None, help="Entry point: a number or a symbol of the image (default _start / the ELF entry).")
@click.option("--intercept", "intercepts", multiple=True, metavar="SPEC", help=("Add an intercept (repeatable): io:0x3f8, io:all, msr-write:IA32_EFER, msr:all, cr0:PG, exception:PF, hlt, pause, "
                    "interrupt-window, preemption-timer:VALUE (VMCS timer units), ... -- the same language as a scenario's 'intercept'. "
                    "By default KVM's policy applies: every I/O instruction, HLT, MWAIT/MONITOR, RDPMC, MOV DR, "
                    "external interrupts and NMIs, the MSRs KVM does not pass through and the CR0/CR4 bits it owns exit, as do "
                    "CPUID and the VMX instructions. io:PORT narrows the I/O class to those ports (and 0xF4, the debug-exit port); "
                    "msr-...:NAME narrows MSRs; cr0:BITS narrows CR0 the same way."))
@click.option("--max-tsc", type=click.IntRange(min=1), default=200_000_000, show_default=True, help="Stop after this many guest TSC ticks.")
@click.option("--timeout", type=click.FloatRange(min=0), default=0.0, metavar="SECONDS", help="Wall-clock limit of the run (0: none); exit status 133 when it passes.")
@click.option("--trace", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Write exits/entries to FILE.jsonl and a Perfetto timeline FILE.json.")
@click.option("--stat", is_flag=True, help="Print a kvm_stat-like table of exits at the end.")
@click.option("--swap-out", "swap_out", multiple=True, metavar="GPA", help="Swap this guest page out on the host before the run (async page faults).")
@click.option("--record", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Record the run (image, options, every exit) for pyvmx replay.")
@click.option("--gdb", "gdb_port", type=int, default=None, metavar="PORT", help="Serve gdb's remote protocol for vCPU 0 on 127.0.0.1:PORT (target remote :PORT).")
@click.option("--append", default="", metavar="ARGS", help="A Multiboot kernel's command line (QEMU's -append); its exit status is then QEMU's (code << 1) | 1.")
def run_command(image: Path, memory_mib: int, vcpus: int, pcpus: int, mode: str, load_address: str | None, entry: str | None,
                intercepts: tuple[str, ...], max_tsc: int, trace: Path | None, stat: bool, swap_out: tuple[str, ...], record: Path | None,
                gdb_port: int | None, timeout: float, append: str) -> None:
    """Run a guest IMAGE (flat binary, ELF, or assembly source) on the KVM-style hypervisor.

    Exit status: the guest's debug-exit code (port 0xF4) & 0x7F; 128 halted forever; 129 shutdown
    (triple fault); 130 Ctrl-C (the trace and statistics so far are still written); 131 guest-TSC
    limit; 132 failed entry / internal error; 133 wall-clock limit."""
    from pyvmx.tools import run as runner

    try:
        address = None if load_address is None else int(load_address, 0)
    except ValueError:
        fail(f"--load-address {load_address!r} is not a number")
    try:
        pages = tuple(int(gpa, 0) for gpa in swap_out)
    except ValueError:
        fail(f"--swap-out takes guest-physical addresses, not {' '.join(swap_out)!r}")
    options = runner.RunOptions(image, memory_mib, vcpus, pcpus, mode, address, entry, intercepts, max_tsc, trace, stat, pages, record,
                                gdb=gdb_port, timeout=timeout or None, append=append)
    err_console = make_console(stderr=True)
    try:
        if err_console.is_terminal and gdb_port is None:
            result = _run_with_progress(runner, options, err_console)
        else:
            result = runner.run(options)
    except ValueError as exc:
        fail(str(exc))
    runner.print_result(result, err_console, stat=stat)
    sys.exit(result.status)


@cli.command("unittests")
@click.argument("build", type=click.Path(path_type=Path, file_okay=False))
@click.argument("tests", nargs=-1)
@click.option("--group", default=None, help="Run only the tests of this unittests.cfg group.")
@click.option("--timeout", type=click.FloatRange(min=1), default=None, metavar="SECONDS", help="Wall-clock limit per test (default: its unittests.cfg timeout, else 90 s).")
@click.option("--logs", type=click.Path(path_type=Path, file_okay=False), default=None, help="Write each test's serial output to DIR/NAME.log.")
@click.option("--json", "json_out", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Write the results to FILE as JSON.")
def unittests_command(build: Path, tests: tuple[str, ...], group: str | None, timeout: float | None, logs: Path | None, json_out: Path | None) -> None:
    """Run kvm-unit-tests (BUILD = its x86 directory with unittests.cfg and the .flat images) as
    run_tests.sh does; exit status 1 if any test fails."""
    from pyvmx.tools import unittests

    try:
        report = unittests.run_unittests(build, tests, group=group, timeout=timeout, logs=logs,
                                         on_outcome=lambda o: click.echo(o.line()))
        if json_out is not None:
            unittests.write_json(report, json_out)
    except ValueError as exc:
        fail(str(exc))
    click.echo(report.summary())
    sys.exit(1 if report.count(unittests.Result.FAIL) else 0)


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
    except InputError as exc:  # any untrusted file (scenario, record, trace, VMCS) that is bad
        fail(str(exc))
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
