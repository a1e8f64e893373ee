"""`python -m slimctl` (and `torchrun -m slimctl`) run the CLI."""

from slimctl.cli import main

if __name__ == "__main__":
    main()
