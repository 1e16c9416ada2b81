"""`python -m shifu ...` is the `shifu` command (and what `accelerate launch -m shifu train` runs)."""

from shifu.cli import main

main()
