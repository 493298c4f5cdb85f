"""`python -m quill.cli`, as the `quill` script."""
import sys

from quill.cli import main

sys.exit(main())
