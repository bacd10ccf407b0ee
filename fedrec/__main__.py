"""``python -m fedrec`` — the same as the ``fedrec`` console command."""

from fedrec.simulations.cli.main import main

if __name__ == "__main__":
    main()
