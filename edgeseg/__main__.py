"""`python -m edgeseg` is the same as the `edgeseg` console script."""

from edgeseg.cli.app import main

if __name__ == "__main__":
    main()
