from pyvmx.tools.cli import main

main()
