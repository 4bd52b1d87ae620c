"""torchrun entry point for test_distributed: `catchtag scan`, except that rank 1 fails at its first batch."""

import faulthandler
import os

from catchtag.cli import main
from catchtag.errors import CatchtagError
from catchtag.scan import RunFolder

if os.environ.get("RANK") == "1":
    def write_part(self, *args, **kwargs):
        raise CatchtagError("injected failure on rank 1 (test)")

    RunFolder.write_part = write_part

if os.environ.get("CATCHTAG_TEST_STACKS_AFTER"):  # a diagnosis aid: every thread's stack if this rank hangs
    faulthandler.dump_traceback_later(float(os.environ["CATCHTAG_TEST_STACKS_AFTER"]), exit=True)
main()
