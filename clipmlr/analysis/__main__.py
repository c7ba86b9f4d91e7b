"""python -m clipmlr.analysis sweep | zeroshot | negation | maps ..."""
import sys

from .commands import main

sys.exit(main())
