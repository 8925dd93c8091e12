"""``python -m sandboxd.runtimes.guest [DATA_DIR]``: prepare the microVM guest kernel + initramfs.

Run by the set-up script (it needs apt's index and network access to the mirror once); later
calls find the verified artifacts and return at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sandboxd.runtimes.guest import GuestError, prepare_guest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandboxd.runtimes.guest", description=__doc__)
    parser.add_argument("data_dir", nargs="?", default="/var/lib/sandboxd", type=Path)
    args = parser.parse_args(argv)
    try:
        guest = prepare_guest(args.data_dir, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except GuestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"kernel {guest.kernel}\ninitrd {guest.initrd}\nrelease {guest.release}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
