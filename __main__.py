"""`python -m align ...` runs the `align` command (so torchrun and the deepspeed launcher can start it)."""

from align.cli import main

main()
