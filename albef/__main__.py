"""`python -m albef ...`: the same as the `albef` console script (albef.cli.run)."""
from albef.cli import run

if __name__ == '__main__':
    run()
