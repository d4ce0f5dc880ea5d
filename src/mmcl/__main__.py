"""`python -m mmcl ...` is the `mmcl` command; Accelerate's launcher starts it so: `accelerate launch -m mmcl run ...`."""

import sys

from mmcl.cli import main

if __name__ == "__main__":
    sys.exit(main())
