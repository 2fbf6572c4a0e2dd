"""Guests from source: assemble x86 assembly (GNU as) into flat images with their symbols."""

from pyvmx.guest.assemble import AssemblyError, GuestImage, assemble, assemble_file

__all__ = ["AssemblyError", "GuestImage", "assemble", "assemble_file"]
