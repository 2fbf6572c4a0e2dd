"""pyvmx: Intel VT-x in Python -- a software VMX machine faithful to the SDM, a KVM-style
hypervisor on top of it, and the tools hypervisor engineers use."""

__version__ = "0.1.0"
