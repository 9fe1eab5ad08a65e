"""The main job: ``python -m dwsep`` (or the ``dwsep`` console script).

Prints the build info and a MobileNetV1 summary, then runs the benchmark report for this
machine (``python -m dwsep bench --help`` for its options).
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    import dwsep

    parser = argparse.ArgumentParser(prog="dwsep", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd")
    sub.add_parser("info", help="print build info and a MobileNetV1 summary")
    args, rest = parser.parse_known_args(argv)

    if args.cmd in (None, "info"):
        print("dwsep build info:")
        print(json.dumps(dwsep.build_info(), indent=2))
        try:
            from dwsep.models import model_summary
        except ImportError:
            model_summary = None
        if model_summary is not None:
            print()
            print(model_summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
