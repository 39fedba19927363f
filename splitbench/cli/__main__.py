"""`python -m splitbench.cli`: the same CLI as the `splitbench` command."""
from splitbench.cli import main

main()
