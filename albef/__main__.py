import sys

from albef.cli import main
from models.checkpoint import CheckpointError

if __name__ == '__main__':
    try:
        main()
    except (CheckpointError, ValueError, OSError) as error:  # wrong kind, file, config: no traceback
        sys.exit(f'error: {error}')
