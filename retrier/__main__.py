"""`python -m retrier` is the `tiers` command."""

from ._cli import main

main()
