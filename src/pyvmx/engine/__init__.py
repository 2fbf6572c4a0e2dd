"""The CPU engine: real x86 execution (Unicorn, QEMU's TCG) under the VT-x machine.

This is the only package that imports Unicorn.
"""
