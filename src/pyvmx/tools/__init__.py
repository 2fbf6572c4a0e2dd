"""The tools people use: the ``pyvmx`` command line, tracing, statistics, VMCS dumps."""
