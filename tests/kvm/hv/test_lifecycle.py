"""The object chain and the vCPU's state between runs: hypervisor -> VM -> vCPU -> run(); memory
regions, images, the three start modes, register access (KVM_GET/SET_REGS, SREGS, MSRS), MMIO,
hypercalls, CPUID, NMIs. References: Linux include/uapi/linux/kvm.h and
Documentation/virt/kvm/api.rst for the ioctls; SDM 10.1.1 (reset state), 27.3.1.1 and 25.6.2
(unrestricted guest), 27.4 (VM-entry MSR loading)."""

from __future__ import annotations

import pytest

from pyvmx.arch.msr import Msr
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.x86 import Cr0, Efer
from pyvmx.kvm.boot import setup_long_mode
from pyvmx.kvm.cpuid import CpuidEntry, default_cpuid
from pyvmx.kvm.exits import DebugExit, IoExit, MmioExit
from pyvmx.kvm.hypercalls import KVM_ENOSYS, PYVMX_HC_EXIT, PYVMX_HC_PUTCHAR
from pyvmx.kvm.kvm import Kvm
from pyvmx.kvm.loader import load_elf
from pyvmx.kvm.memslots import KVM_MEM_READONLY, MemslotError
from pyvmx.kvm.regs import Regs

from tests.kvm.hv.elf_builder import ElfSpec, Segment, build_elf
from tests.kvm.hv.guests import DEFAULT_LIMIT, boot, image, source_image, u32, u64

pytestmark = pytest.mark.machine


@pytest.fixture
def kvm() -> Kvm:
    return Kvm()


# --- memory ----------------------------------------------------------------------------------------
def test_memory_regions_follow_kvm_set_user_memory_region(kvm: Kvm) -> None:
    """KVM_SET_USER_MEMORY_REGION over the VMM's mmap'd memory: overlapping slots are EEXIST."""
    vm = kvm.create_vm()
    hva = kvm.host_mm.mmap(2 << 20)
    vm.set_user_memory_region(0, 0, 0, 2 << 20, hva)
    with pytest.raises(MemslotError, match="EEXIST"):
        vm.add_ram(1 << 20, 1 << 20)
    vm.add_ram(4 << 20, 1 << 20)
    vm.write_guest(0x1234, b"abc")
    assert kvm.host_mm.read(hva + 0x1234, 3) == b"abc"
    assert len(vm.memslots) == 2


def test_vcpu_ids_are_unique(kvm: Kvm) -> None:
    """KVM_CREATE_VCPU with an id in use fails with EEXIST (Linux virt/kvm/kvm_main.c kvm_vm_ioctl_create_vcpu())."""
    vm = kvm.create_vm(memory_size=1 << 20)
    ap = vm.create_vcpu(3)
    assert ap.get_msr("APIC_BASE") == 0xFEE00800  # not the BSP: IA32_APIC_BASE[8] clear
    with pytest.raises(ValueError, match="EEXIST"):
        vm.create_vcpu(3)


# --- start modes ---------------------------------------------------------------------------------
def test_reset_state_runs_real_mode_firmware(kvm: Kvm) -> None:
    """A vCPU starts at reset: CS.base = FFFF0000H, IP = FFF0H, real mode with CR0 = 60000010H
    (SDM 10.1.1) -- possible only with "unrestricted guest". The firmware is a 64-KiB read-only
    slot (KVM_MEM_READONLY) at the top of 4 GiB, aliased at F0000H by a second slot over the same
    host memory, as a PC's BIOS is; its reset vector far-jumps to F000:E05B."""
    vm = kvm.create_vm(memory_size=512 << 10)
    rom = source_image(
        """
        . = 0xe05b
    post:
        mov $0x3f8, %dx
        mov $0x21, %al
        out %al, %dx
        mov $0x11, %al
        out %al, $0xf4
        hlt
        . = 0xfff0
    reset:
        ljmp $0xf000, $post
        """,
        0,
        bits=16,
    )
    hva = kvm.host_mm.mmap(0x10000)
    kvm.host_mm.write(hva, rom.code.ljust(0x10000, b"\xff"))
    vm.set_user_memory_region(1, KVM_MEM_READONLY, 0xFFFF0000, 0x10000, hva)
    vm.set_user_memory_region(2, KVM_MEM_READONLY, 0xF0000, 0x10000, hva)
    vcpu = vm.create_vcpu()
    sregs = vcpu.get_sregs()
    assert (sregs.cs.selector, sregs.cs.base, sregs.cr0) == (0xF000, 0xFFFF0000, 0x60000010)
    assert vcpu.get_regs().rip == 0xFFF0 and vcpu.get_gpr("rdx") == 0x00050654
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(0x11)
    assert vm.serial_output == b"!" and vcpu.get_sregs().cs.base == 0xF0000


def test_real_mode_entry(kvm: Kvm) -> None:
    """Real mode at CS:IP with unrestricted guest (SDM 27.3.1.1): CS.base = selector << 4 (SDM 20.1.1)."""
    vm = kvm.create_vm(memory_size=1 << 20)
    img = source_image("mov $0x3f8, %dx\nmov $0x52, %al\nout %al, %dx\nmov %cs, %ax\nout %al, $0xf4\nhlt\n", 0x12340, bits=16)
    vcpu = boot(vm, img, mode="real")
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(0x00)  # CS = 0x1000: low byte 0
    assert vm.serial_output == b"R" and vcpu.get_sregs().cs.selector == 0x1000


def test_protected_mode_entry(kvm: Kvm) -> None:
    """32-bit protected mode, paging off, from a GDT the hypervisor wrote (SDM 10.8); CR0 as the guest reads it through the read shadow (SDM 26.3)."""
    vm = kvm.create_vm(memory_size=1 << 20)
    img = source_image("mov %cr0, %eax\nout %al, $0xf4\nhlt\n", bits=32)
    vcpu = boot(vm, img, mode="protected")
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(int(Cr0.PE | Cr0.MP | Cr0.ET | Cr0.NE))
    assert not vcpu.get_sregs().cr0 & Cr0.PG


def test_elf_image_runs_with_hypercalls(kvm: Kvm) -> None:
    """An ELF executable loaded by its PT_LOAD segments (bss zeroed), printing through the
    pyvmx putchar hypercall and ending with the exit hypercall; an unknown hypercall returns
    -KVM_ENOSYS in RAX (Documentation/virt/kvm/x86/hypercalls.rst)."""
    code = source_image(
        f"""
        mov $0x777, %eax
        vmcall
        mov %rax, result(%rip)
        lea text(%rip), %rsi
    1:  movzbl (%rsi), %ebx
        test %ebx, %ebx
        jz 2f
        mov ${PYVMX_HC_PUTCHAR}, %eax
        vmcall
        inc %rsi
        jmp 1b
    2:  mov ${PYVMX_HC_EXIT}, %eax
        mov bss(%rip), %ebx
        add $7, %ebx
        vmcall
    text: .asciz "elf!"
        .align 8
    result: .quad 0
    bss = 0x201000
        """,
        0x200000,
    )
    elf = build_elf(ElfSpec(0x200000, [Segment(0x200000, code.code, memsz=0x2000)]))
    vm = kvm.create_vm(memory_size=4 << 20)
    vm.write_guest(0x201000, b"\xff" * 8)  # the loader must zero p_memsz - p_filesz
    image = load_elf(vm, elf)
    assert image.entry == 0x200000 and image.segments == ((0x200000, 0x2000),)
    vcpu = vm.create_vcpu()
    setup_long_mode(vcpu, image.entry)
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(7, via="hypercall")
    assert vm.hypercall_output == b"elf!"
    assert u64(vm, code.symbol("result")) == (-KVM_ENOSYS) & (2**64 - 1)


# --- registers -----------------------------------------------------------------------------------------
def test_regs_and_sregs_round_trip(kvm: Kvm) -> None:
    """KVM_SET_REGS/SREGS then GET: what was set comes back; long mode sets EFER.LMA and the
    "IA-32e mode guest" entry control (vmx_set_efer())."""
    vm = kvm.create_vm(memory_size=1 << 20)
    vcpu = vm.create_vcpu()
    setup_long_mode(vcpu, 0x10000)
    regs = Regs(rax=1, rbx=2, rcx=3, rdx=4, rsi=5, rdi=6, rsp=0x9000, rbp=8, r8=9, r15=0xFFFFFFFFFFFFFFFF, rip=0x10004, rflags=0x202)
    vcpu.set_regs(regs)
    assert vcpu.get_regs() == regs
    sregs = vcpu.get_sregs()
    assert sregs.efer & Efer.LMA and sregs.cs.l and sregs.cr0 & Cr0.PG and sregs.cr3 == 0x2000
    vcpu.set_sregs(sregs)
    assert vcpu.get_sregs() == sregs
    assert vcpu.vmcs_read(F.VM_ENTRY_CONTROLS) & (1 << 9)


def test_msrs_between_runs(kvm: Kvm) -> None:
    """KVM_GET/SET_MSRS: VMCS-held (EFER, PAT), register-file-held (LSTAR, KERNEL_GS_BASE: loaded
    by the VM-entry MSR-load area, SDM 27.4) and hypervisor-held (TSC, APIC base, MTRRs) MSRs."""
    vm = kvm.create_vm(memory_size=1 << 20)
    img = source_image(
        """
        mov $0xc0000082, %ecx      # LSTAR: intercepted read
        rdmsr
        mov %eax, lstar(%rip)
        mov $0xc0000102, %ecx      # KERNEL_GS_BASE: passed through, read from the CPU
        rdmsr
        mov %eax, kgs(%rip)
        mov $0x1234, %eax
        xor %edx, %edx
        wrmsr                      # a pass-through write: no exit
        mov $1, %al
        out %al, $0xf4
        hlt
        .align 8
    lstar: .long 0
    kgs:   .long 0
        """
    )
    vcpu = boot(vm, img)
    assert vcpu.set_msr("LSTAR", 0xFFFFFFFF81000000)
    assert vcpu.set_msr(Msr.KERNEL_GS_BASE, 0xABCD0000)
    assert not vcpu.set_msr("IA32_PAT", 0x0808080808080808)  # type 8 is reserved
    assert not vcpu.set_msr(0x12345678, 1)
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(1)
    assert u32(vm, img.symbol("lstar")) == 0x81000000 and u32(vm, img.symbol("kgs")) == 0xABCD0000
    assert vcpu.get_msr("KERNEL_GS_BASE") == 0x1234
    assert vcpu.get_msr("EFER") & Efer.LMA and vcpu.get_msr(Msr.MTRRcap) == 0x508
    assert vcpu.set_msr("IA32_TSC", 10**9) and abs(vcpu.get_msr("IA32_TSC") - 10**9) < 100  # type: ignore[operator]
    assert vcpu.get_msr("APIC_BASE") == 0xFEE00900


def test_rdtscp_sees_tsc_aux_written_by_the_guest(kvm: Kvm) -> None:
    """WRMSR of TSC_AUX exits (intercepted), the store loads it into the CPU at the next entry;
    RDTSCP ("enable RDTSCP") returns it in ECX and the offset TSC in EDX:EAX (SDM 25.6.5)."""
    vm = kvm.create_vm(memory_size=1 << 20)
    img = source_image(
        """
        mov $0xc0000103, %ecx
        mov $0x2a, %eax
        xor %edx, %edx
        wrmsr
        rdtscp
        mov %ecx, aux(%rip)
        shl $32, %rdx
        or %rdx, %rax
        mov %rax, tsc(%rip)
        mov $1, %al
        out %al, $0xf4
        hlt
        .align 8
    aux: .quad 0
    tsc: .quad 0
        """
    )
    vcpu = boot(vm, img)
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(1)
    assert u64(vm, img.symbol("aux")) == 0x2A
    assert 0 < u64(vm, img.symbol("tsc")) <= vcpu.guest_tsc()


# --- CPUID ---------------------------------------------------------------------------------------------
def test_guest_sees_the_cpuid_table(kvm: Kvm) -> None:
    """KVM_SET_CPUID2 before the first run: the guest's CPUID answers from the table."""
    vm = kvm.create_vm(memory_size=1 << 20)
    img = source_image(
        """
        xor %eax, %eax
        cpuid
        mov %ebx, vendor(%rip)
        mov %edx, vendor+4(%rip)
        mov %ecx, vendor+8(%rip)
        mov $0x80000008, %eax
        cpuid
        out %al, $0xf4
        hlt
    vendor: .fill 12, 1, 0
        """
    )
    vcpu = boot(vm, img)
    table = [e for e in default_cpuid(maxphyaddr=40).entries if e.function != 0]
    b, d, c = (int.from_bytes(b"PyVm"), int.from_bytes(b"xPyV"), int.from_bytes(b"mx!!"))
    table.append(CpuidEntry(0, eax=0xD, ebx=int.from_bytes(b"PyVm", "little"), edx=int.from_bytes(b"xPyV", "little"),
                            ecx=int.from_bytes(b"mx!!", "little")))
    del b, d, c
    vcpu.set_cpuid(table)
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(40)
    assert vm.read_guest(img.symbol("vendor"), 12) == b"PyVmxPyVmx!!"


# --- MMIO ----------------------------------------------------------------------------------------------
class Register:
    """A one-register MMIO device."""

    def __init__(self) -> None:
        self.value = 0x5A5A
        self.writes: list[tuple[int, int, int]] = []

    def mmio_read(self, address: int, size: int) -> int:
        return self.value

    def mmio_write(self, address: int, size: int, value: int) -> None:
        self.writes.append((address, size, value))
        self.value = value


def test_mmio_to_a_device_and_to_the_user(kvm: Kvm) -> None:
    """An access where no memslot is: EPT violation -> MMIO SPTE -> the instruction is emulated
    (kvm_mmu_page_fault() RET_PF_EMULATE); an in-kernel device on the MMIO bus answers inside,
    anything else is KVM_EXIT_MMIO -- a load completes with the user's data on the next run."""
    vm = kvm.create_vm(memory_size=2 << 20)
    device = Register()
    vm.mmio_bus.register(0xFEC00000, 0x1000, device, "register")
    img = source_image(
        """
        mov $0xfec00000, %rbx
        movl $0x1234, (%rbx)          # in-kernel device
        mov (%rbx), %eax
        mov %eax, dev(%rip)
        mov $0xfeb00000, %rbx
        movl $0xcafe, 8(%rbx)         # no device: exit to the user
        mov 8(%rbx), %ecx             # ... and a load
        mov %ecx, user(%rip)
        mov $3, %al
        out %al, $0xf4
        hlt
        .align 8
    dev:  .long 0
    user: .long 0
        """
    )
    vcpu = boot(vm, img)
    store = vcpu.run(time_limit=DEFAULT_LIMIT)
    assert isinstance(store, MmioExit) and store.is_write
    assert (store.gpa, store.size, store.value) == (0xFEB00008, 4, 0xCAFE)
    load = vcpu.run(time_limit=DEFAULT_LIMIT)
    assert isinstance(load, MmioExit) and not load.is_write and load.gpa == 0xFEB00008
    load.value = 0xBEEF
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(3)
    assert device.writes == [(0xFEC00000, 4, 0x1234)]
    assert u32(vm, img.symbol("dev")) == 0x1234 and u32(vm, img.symbol("user")) == 0xBEEF


# --- NMI -----------------------------------------------------------------------------------------------
def test_nmi_injection(kvm: Kvm) -> None:
    """KVM_NMI: injected as an NMI (type 2, vector 2) through VM-entry event injection while NMIs
    are not blocked; the guest's handler runs."""
    vm = kvm.create_vm(memory_size=1 << 20)
    img = source_image(
        """
        SET_GATE 2, nmi
        LOAD_IDT
        out %al, $0x80             # "ready": a port nobody claims, an exit to the user
        cli
        mov nmis(%rip), %eax
        out %al, $0xf4
        hlt
    nmi:
        incl nmis(%rip)
        iretq
        .align 8
    nmis: .long 0
        IDT_TABLE
        """
    )
    vcpu = boot(vm, img)
    ready = vcpu.run(time_limit=DEFAULT_LIMIT)
    assert isinstance(ready, IoExit) and ready.port == 0x80
    vcpu.inject_nmi()
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(1)
    assert vcpu.stats.nmi_injections == 1


# --- asynchronous page faults ----------------------------------------------------------------------
def test_async_page_fault_round_trip(kvm: Kvm) -> None:
    """Seed 001: a guest access to a page the host swapped out is an EPT violation whose page is
    not resident; instead of waiting, KVM starts the page-in and injects a "page not present"
    #PF (CR2 = token, reason 1 in the shared area); the guest halts in its handler; when the
    page is in, the page is mapped and "page ready" arrives as the guest's vector with the same
    token; the guest acknowledges and retries (virt/kvm/async_pf.c, arch/x86/kvm/x86.c)."""
    vm = kvm.create_vm(memory_size=4 << 20)
    img = image("async_pf.S")
    vcpu = boot(vm, img)
    vm.write_guest(0x300000, (0x1122334455667788).to_bytes(8, "little"))
    ready = vcpu.run(time_limit=DEFAULT_LIMIT)
    assert isinstance(ready, IoExit) and ready.port == 0x80
    slot = vm.memslots.gfn_to_memslot(0x300)
    assert slot is not None
    kvm.host_mm.swap_out(slot.gfn_to_hva(0x300), 0x1000)
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(1)
    token = u32(vm, img.symbol("token"))
    assert token != 0 and u32(vm, img.symbol("reason")) == 1  # KVM_PV_REASON_PAGE_NOT_PRESENT
    assert u32(vm, img.symbol("ready_token")) == token
    assert u64(vm, img.symbol("value")) == 0x1122334455667788
    assert vcpu.async_pf.stats["apf_not_present"] == 1 and vcpu.async_pf.stats["apf_ready"] >= 1
    assert vcpu.stats.halted_tsc >= kvm.host_mm.page_in_latency * 0.9

