"""The KVM-style hypervisor: VM, vCPU, memslots, MMU, exit handlers, devices."""
