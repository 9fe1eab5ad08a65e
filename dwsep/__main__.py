"""The main job: ``python -m dwsep`` (or the ``dwsep`` console script).

With no subcommand: prints the build info and a MobileNetV1 summary, then runs the benchmark
report for this machine in quick mode. Subcommands:

  ``dwsep info``           build info and the model summary only
  ``dwsep bench [...]``    the full comparison report (``dwsep bench --help`` for its options)
"""

from __future__ import annotations

import argparse
import json
import sys


def _print_info() -> None:
    import dwsep

    print("dwsep build info:")
    print(json.dumps(dwsep.build_info(), indent=2))
    try:
        from dwsep.models import model_summary
    except ImportError:
        model_summary = None
    print()
    if model_summary is not None:
        print(model_summary())
    else:
        print("(MobileNetV1 not available in this build: no model summary)")


def main(argv: list[str] | None = None) -> int:
    from dwsep import report

    parser = argparse.ArgumentParser(
        prog="dwsep",
        description="dwsep: build info, MobileNetV1 summary and the benchmark report. "
        "Without a subcommand: info, then a quick benchmark report for this machine.",
    )
    sub = parser.add_subparsers(dest="cmd")
    sub.add_parser("info", help="print build info and a MobileNetV1 summary")
    bench = sub.add_parser(
        "bench",
        help="run the benchmark report (per-layer and model, against eager and torch.compile)",
        description="Per-layer (13 depthwise + 13 pointwise MobileNetV1 layers) and whole-model "
        "benchmark of dwsep's backends against PyTorch eager and torch.compile, with the roofline "
        "ceilings measured in the same run; writes report.json, report.md and report.png to --out.",
    )
    report.add_arguments(bench)
    args = parser.parse_args(argv)

    if args.cmd == "bench":
        return report.main_from_args(args)
    _print_info()
    if args.cmd == "info":
        return 0
    print()
    print("Running the quick benchmark report for this machine (full: `python -m dwsep bench`).")
    return report.main_from_args(bench.parse_args(["--quick"]))


if __name__ == "__main__":
    sys.exit(main())
