"""The guest's CPUID table: KVM_SET_CPUID2 and the CPUID exit (arch/x86/kvm/cpuid.c).

A table is a list of ``struct kvm_cpuid_entry2`` (function, index, flags, eax..edx).
:meth:`CpuidTable.lookup` answers a guest CPUID as ``kvm_cpuid()`` does: the exact
function/index entry (the index counts only when the entry has KVM_CPUID_FLAG_SIGNIFCANT_INDEX),
else -- on an Intel guest -- the entry of the highest basic leaf when the function is above the
maximum of its class (``get_out_of_range_cpuid_entry()``), else zeros.

A table is checked once, when it is set (``kvm_set_cpuid()`` / ``kvm_check_cpuid()``): at most
KVM_MAX_CPUID_ENTRIES entries, 32-bit registers, known flags, no two entries answering the same
function/index, the virtual-address width in 80000008H:EAX[15:8] 48, 57 or 0, the guest
MAXPHYADDR (80000008H:EAX[7:0]) between 32 and the host's. A bad table raises
:class:`CpuidError` (a ValueError) and changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pyvmx.kvm.cpu_features import register_value

KVM_MAX_CPUID_ENTRIES = 256
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0  # (sic) uapi/asm/kvm.h
KVM_CPUID_FLAG_STATEFUL_FUNC = 1 << 1
KVM_CPUID_FLAG_STATE_READ_NEXT = 1 << 2
_KNOWN_FLAGS = KVM_CPUID_FLAG_SIGNIFCANT_INDEX | KVM_CPUID_FLAG_STATEFUL_FUNC | KVM_CPUID_FLAG_STATE_READ_NEXT

KVM_CPUID_SIGNATURE = 0x40000000
KVM_CPUID_FEATURES = 0x40000001
KVM_CPUID_TIMING_INFO = 0x40000010  # TSC and APIC bus rates in kHz (QEMU's "vmware-cpuid-freq")
CRYSTAL_HZ = 25_000_000  # the nominal core crystal clock CPUID 15H reports (Skylake server parts)
# uapi/asm/kvm_para.h KVM_FEATURE_* (bits of CPUID 40000001H:EAX)
KVM_FEATURE_CLOCKSOURCE = 0
KVM_FEATURE_NOP_IO_DELAY = 1
KVM_FEATURE_CLOCKSOURCE2 = 3
KVM_FEATURE_ASYNC_PF = 4
KVM_FEATURE_PV_UNHALT = 7
KVM_FEATURE_ASYNC_PF_VMEXIT = 10
KVM_FEATURE_PV_SCHED_YIELD = 13
KVM_FEATURE_ASYNC_PF_INT = 14

# CPUID.01H:ECX / EDX and 07H:EBX feature bits used below (SDM Vol. 2A CPUID, Tables 3-10/3-11).
CPUID_1_ECX_SSE3 = 1 << 0
CPUID_1_ECX_CX16 = 1 << 13
CPUID_1_ECX_POPCNT = 1 << 23
CPUID_1_ECX_XSAVE = 1 << 26
CPUID_1_ECX_OSXSAVE = 1 << 27
CPUID_1_ECX_HYPERVISOR = 1 << 31
CPUID_1_EDX_FPU = 1 << 0
CPUID_1_EDX_DE = 1 << 2
CPUID_1_EDX_PSE = 1 << 3
CPUID_1_EDX_TSC = 1 << 4
CPUID_1_EDX_MSR = 1 << 5
CPUID_1_EDX_PAE = 1 << 6
CPUID_1_EDX_MCE = 1 << 7
CPUID_1_EDX_CX8 = 1 << 8
CPUID_1_EDX_SEP = 1 << 11
CPUID_1_EDX_MTRR = 1 << 12
CPUID_1_EDX_PGE = 1 << 13
CPUID_1_EDX_CMOV = 1 << 15
CPUID_1_EDX_PAT = 1 << 16
CPUID_1_EDX_PSE36 = 1 << 17
CPUID_1_EDX_CLFSH = 1 << 19
CPUID_1_EDX_MMX = 1 << 23
CPUID_1_EDX_FXSR = 1 << 24
CPUID_1_EDX_SSE = 1 << 25
CPUID_1_EDX_SSE2 = 1 << 26
CPUID_7_EBX_FSGSBASE = 1 << 0
CPUID_7_EBX_SMEP = 1 << 7
CPUID_7_EBX_SMAP = 1 << 20
CPUID_80000001_ECX_LAHF = 1 << 0
CPUID_80000001_EDX_SYSCALL = 1 << 11
CPUID_80000001_EDX_NX = 1 << 20
CPUID_80000001_EDX_PDPE1GB = 1 << 26
CPUID_80000001_EDX_RDTSCP = 1 << 27
CPUID_80000001_EDX_LM = 1 << 29

XFEATURE_MASK_FP = 1 << 0
XFEATURE_MASK_SSE = 1 << 1
XFEATURE_MASK_YMM = 1 << 2
XFEATURE_MASK_BNDREGS = 1 << 3
XFEATURE_MASK_BNDCSR = 1 << 4
XFEATURE_MASK_AVX512 = 0x7 << 5  # opmask, ZMM_Hi256, Hi16_ZMM

_U32 = 0xFFFFFFFF
BRAND_STRING = "pyvmx virtual CPU (Intel VT-x model)"


class CpuidError(ValueError):
    """A CPUID table KVM_SET_CPUID2 would refuse; ``errno`` is Linux's ("EINVAL", "E2BIG",
    "EBUSY"), ``entry`` the index of the offending entry when there is one."""

    def __init__(self, errno: str, message: str, entry: int | None = None) -> None:
        where = f"entry {entry}: " if entry is not None else ""
        super().__init__(f"{errno}: {where}{message}")
        self.errno = errno
        self.entry = entry


@dataclass(frozen=True, slots=True)
class CpuidEntry:
    """``struct kvm_cpuid_entry2``."""

    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0

    @property
    def significant_index(self) -> bool:
        return bool(self.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX)

    def matches(self, function: int, index: int) -> bool:
        """``cpuid_entry2_find()``'s test."""
        return self.function == function and (not self.significant_index or self.index == index)

    @property
    def registers(self) -> tuple[int, int, int, int]:
        return self.eax, self.ebx, self.ecx, self.edx


def _dwords(text: str, count: int) -> tuple[int, ...]:
    """``text`` as ``count`` little-endian dwords, NUL-padded."""
    raw = text.encode().ljust(4 * count, b"\0")
    if len(raw) != 4 * count:
        raise ValueError(f"{text!r} does not fit in {count} registers")
    return tuple(int.from_bytes(raw[i : i + 4], "little") for i in range(0, 4 * count, 4))


def vendor_registers(vendor: str) -> tuple[int, int, int]:
    """CPUID.0's EBX, ECX, EDX for a 12-character vendor string.  The string is read in the
    order EBX, EDX, ECX (SDM Vol. 2A CPUID, "Basic CPUID Information": "Genu" "ineI" "ntel"),
    so EDX holds the second dword and ECX the third."""
    ebx, edx, ecx = _dwords(vendor, 3)
    return ebx, ecx, edx


def signature_registers(signature: str) -> tuple[int, int, int]:
    """EBX, ECX, EDX of a hypervisor signature leaf (0x40000000): the string in EBX, ECX, EDX
    order, as Linux's ``hypervisor_cpuid_base()`` reads "KVMKVMKVM\\0\\0\\0"."""
    ebx, ecx, edx = _dwords(signature, 3)
    return ebx, ecx, edx


def brand_entries(brand: str) -> list[CpuidEntry]:
    """Leaves 80000002H-80000004H: the 48-byte processor brand string, NUL-terminated, 16
    bytes per leaf in EAX, EBX, ECX, EDX order (SDM Vol. 2A CPUID, "Processor Brand String")."""
    if len(brand.encode()) > 47:
        raise ValueError(f"a brand string holds at most 47 characters, not {len(brand)}")
    dwords = _dwords(brand, 12)
    return [CpuidEntry(0x80000002 + i, eax=a, ebx=b, ecx=c, edx=d) for i, (a, b, c, d) in enumerate(zip(*[iter(dwords)] * 4))]


class CpuidTable:
    """A checked, immutable CPUID table (see the module docstring)."""

    def __init__(self, entries: Iterable[CpuidEntry], *, host_maxphyaddr: int = 46) -> None:
        self._entries: tuple[CpuidEntry, ...] = tuple(entries)
        self._check(host_maxphyaddr)

    @property
    def entries(self) -> tuple[CpuidEntry, ...]:
        return self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CpuidTable) and sorted(self._key(e) for e in self._entries) == sorted(
            self._key(e) for e in other._entries
        )

    __hash__ = None  # type: ignore[assignment]

    @staticmethod
    def _key(e: CpuidEntry) -> tuple[int, ...]:
        return (e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)

    # --- checks ----------------------------------------------------------------------------------
    def _check(self, host_maxphyaddr: int) -> None:
        entries = self._entries
        if len(entries) > KVM_MAX_CPUID_ENTRIES:
            raise CpuidError("E2BIG", f"{len(entries)} entries is more than KVM_MAX_CPUID_ENTRIES ({KVM_MAX_CPUID_ENTRIES})")
        for i, e in enumerate(entries):
            if not isinstance(e, CpuidEntry):
                raise CpuidError("EINVAL", f"{e!r} is not a CpuidEntry", i)
            for name in ("function", "index", "eax", "ebx", "ecx", "edx", "flags"):
                value = getattr(e, name)
                if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _U32:
                    raise CpuidError("EINVAL", f"{name} {value!r} is not a 32-bit unsigned integer", i)
            if e.flags & ~_KNOWN_FLAGS:
                raise CpuidError("EINVAL", f"unknown flags {e.flags & ~_KNOWN_FLAGS:#x}", i)
            if not e.significant_index and e.index:
                raise CpuidError(
                    "EINVAL",
                    f"leaf {e.function:#x} has index {e.index:#x} but no KVM_CPUID_FLAG_SIGNIFCANT_INDEX: the index would be ignored",
                    i,
                )
        by_function: dict[int, list[int]] = {}
        for i, e in enumerate(entries):
            for j in by_function.get(e.function, []):
                other = entries[j]
                # Two entries answer the same CPUID if either ignores the index, or both name it.
                if not (e.significant_index and other.significant_index) or e.index == other.index:
                    raise CpuidError(
                        "EINVAL", f"duplicate leaf {e.function:#x} index {e.index:#x} (also entry {j})", i
                    )
            by_function.setdefault(e.function, []).append(i)
        ext8 = self.find(0x80000008)
        if ext8 is not None:
            vaddr_bits = (ext8.eax >> 8) & 0xFF
            if vaddr_bits not in (48, 57, 0):
                raise CpuidError("EINVAL", f"CPUID 80000008H:EAX[15:8] = {vaddr_bits}: virtual-address width must be 48, 57 or 0")
            phys = ext8.eax & 0xFF
            if not 32 <= phys <= host_maxphyaddr:
                raise CpuidError(
                    "EINVAL",
                    f"CPUID 80000008H:EAX[7:0] = {phys}: guest MAXPHYADDR must be between 32 and the host's {host_maxphyaddr}",
                )

    # --- lookups ---------------------------------------------------------------------------------
    def find(self, function: int, index: int = 0) -> CpuidEntry | None:
        """``kvm_find_cpuid_entry_index()``."""
        for e in self._entries:
            if e.matches(function, index):
                return e
        return None

    @property
    def guest_maxphyaddr(self) -> int:
        """``cpuid_maxphyaddr()``: 80000008H:EAX[7:0], or 36 without that leaf."""
        ext0 = self.find(0x80000000)
        if ext0 is not None and ext0.eax >= 0x80000008:
            ext8 = self.find(0x80000008)
            if ext8 is not None:
                return ext8.eax & 0xFF
        return 36

    def has(self, function: int, index: int, register: str, bit: int) -> bool:
        e = self.find(function, index)
        return e is not None and bool(getattr(e, register) & bit)

    def _out_of_range_entry(self, function: int, index: int) -> tuple[int, CpuidEntry | None]:
        basic = self.find(0)
        if basic is None:
            return function, None
        if (basic.ebx, basic.ecx, basic.edx) in (vendor_registers("AuthenticAMD"), vendor_registers("HygonGenuine")):
            return function, None
        if 0x40000000 <= function <= 0x4FFFFFFF:
            klass = self.find(function & 0xFFFFFF00)
        elif function >= 0xC0000000:
            klass = self.find(0xC0000000)
        else:
            klass = self.find(function & 0x80000000)
        if klass is not None and function <= klass.eax:
            return function, None
        return basic.eax, self.find(basic.eax, index)

    def lookup(self, function: int, index: int) -> tuple[tuple[int, int, int, int], bool]:
        """``kvm_cpuid()``: (EAX, EBX, ECX, EDX) for CPUID with EAX = ``function``, ECX =
        ``index``, and whether an exact entry answered."""
        function &= _U32
        index &= _U32
        entry = self.find(function, index)
        exact = entry is not None
        effective = function
        if entry is None:
            effective, entry = self._out_of_range_entry(function, index)
        if entry is not None:
            return entry.registers, exact
        eax = ebx = ecx = edx = 0
        if effective in (0xB, 0x1F):
            leaf1 = self.find(effective, 1)
            if leaf1 is not None:
                ecx = index & 0xFF
                edx = leaf1.edx
        return (eax, ebx, ecx, edx), exact


def tsc_entries(tsc_hz: int) -> list[CpuidEntry]:
    """The leaves that tell a guest the TSC rate, so it need not calibrate against the PIT:

    * 15H (SDM Vol. 2A CPUID, "Time Stamp Counter and Nominal Core Crystal Clock"): TSC
      frequency = ECX (crystal Hz) * EBX / EAX -- Linux's ``native_calibrate_tsc()`` trusts it
      and sets X86_FEATURE_TSC_KNOWN_FREQ;
    * 16H: base and maximum frequency in MHz, bus (reference) clock 100 MHz;
    * 40000010H: EAX the TSC rate in kHz, EBX the local-APIC bus rate in kHz -- 0, this machine
      has no local APIC timer (the timing leaf QEMU adds for KVM guests, target/i386/kvm/kvm.c).
    """
    if not 1_000_000 <= tsc_hz <= _U32:
        raise ValueError(f"a TSC rate of {tsc_hz} Hz cannot be reported in CPUID 15H (1 MHz .. 4.29 GHz)")
    crystal = CRYSTAL_HZ
    g = math.gcd(tsc_hz, crystal)
    mhz = tsc_hz // 1_000_000
    return [
        CpuidEntry(0x15, eax=crystal // g, ebx=tsc_hz // g, ecx=crystal),
        CpuidEntry(0x16, eax=mhz, ebx=mhz, ecx=100),
        CpuidEntry(KVM_CPUID_TIMING_INFO, eax=tsc_hz // 1000, ebx=0),
    ]


def default_cpuid(
    *,
    vcpu_id: int = 0,
    maxphyaddr: int = 46,
    host_maxphyaddr: int = 46,
    vendor: str = "GenuineIntel",
    tsc_hz: int = 1_000_000_000,
) -> CpuidTable:
    """What a VMM would pass to KVM_SET_CPUID2 for this model: the features the VT-x machine
    executes (:data:`pyvmx.kvm.cpu_features.ADVERTISED`, each backed by a guest test), KVM's
    signature, PV feature and timing leaves, the TSC rate (:func:`tsc_entries`), and the guest
    MAXPHYADDR in 80000008H (configurable: smaller than the host's makes KVM trap #PF, see
    :func:`pyvmx.kvm.vmcs_setup.exception_bitmap`)."""
    b, c, d = vendor_registers(vendor)
    kvm_b, kvm_c, kvm_d = signature_registers("KVMKVMKVM")
    kvm_features = (
        (1 << KVM_FEATURE_NOP_IO_DELAY) | (1 << KVM_FEATURE_ASYNC_PF) | (1 << KVM_FEATURE_PV_UNHALT)
        | (1 << KVM_FEATURE_ASYNC_PF_VMEXIT) | (1 << KVM_FEATURE_PV_SCHED_YIELD) | (1 << KVM_FEATURE_ASYNC_PF_INT)
    )
    sig = KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    entries = [
        CpuidEntry(0x0, eax=0x16, ebx=b, ecx=c, edx=d),
        # family 6, model 0x55, stepping 4; CLFLUSH line 8 qwords; APIC ID = vCPU id
        CpuidEntry(
            0x1, eax=0x00050654, ebx=(vcpu_id & 0xFF) << 24 | 1 << 16 | 8 << 8,
            ecx=register_value(0x1, "ecx"), edx=register_value(0x1, "edx"),
        ),
        CpuidEntry(0x7, 0, sig, eax=0, ebx=register_value(0x7, "ebx"), ecx=register_value(0x7, "ecx"), edx=register_value(0x7, "edx")),
        CpuidEntry(0xD, 0, sig, eax=XFEATURE_MASK_FP | XFEATURE_MASK_SSE, ebx=0x240, ecx=0x240),
        CpuidEntry(0xD, 1, sig),
        CpuidEntry(KVM_CPUID_SIGNATURE, eax=KVM_CPUID_TIMING_INFO, ebx=kvm_b, ecx=kvm_c, edx=kvm_d),
        CpuidEntry(KVM_CPUID_FEATURES, eax=kvm_features),
        *tsc_entries(tsc_hz),
        CpuidEntry(0x80000000, eax=0x80000008),
        CpuidEntry(0x80000001, ecx=register_value(0x80000001, "ecx"), edx=register_value(0x80000001, "edx")),
        CpuidEntry(0x80000007, edx=register_value(0x80000007, "edx")),
        *brand_entries(BRAND_STRING),
        CpuidEntry(0x80000008, eax=(48 << 8) | maxphyaddr),
    ]
    return CpuidTable(entries, host_maxphyaddr=host_maxphyaddr)


def table_from(entries: Sequence[CpuidEntry | dict[str, int]], *, host_maxphyaddr: int = 46) -> CpuidTable:
    """A table from entries or dicts with the ``struct kvm_cpuid_entry2`` field names; a dict
    with unknown or missing keys is a malformed entry (:class:`CpuidError`)."""
    built: list[CpuidEntry] = []
    for i, e in enumerate(entries):
        if isinstance(e, CpuidEntry):
            built.append(e)
            continue
        if not isinstance(e, dict):
            raise CpuidError("EINVAL", f"{e!r} is neither a CpuidEntry nor a dict", i)
        unknown = set(e) - {"function", "index", "flags", "eax", "ebx", "ecx", "edx"}
        if unknown:
            raise CpuidError("EINVAL", f"unknown fields {sorted(unknown)}", i)
        if "function" not in e:
            raise CpuidError("EINVAL", "no 'function'", i)
        built.append(CpuidEntry(**e))
    return CpuidTable(built, host_maxphyaddr=host_maxphyaddr)
