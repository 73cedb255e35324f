"""The `rnnkit` command line: argument parsing only, one sub-command per app."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rnnkit import bench
from rnnkit.engine import BACKENDS


def _size(text: str) -> tuple[int, int, int]:
    """'T,N,H' -> (T, N, H), each a positive int."""
    parts = text.split(",")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) != 3 or min(size) < 1:
        raise argparse.ArgumentTypeError(
            f"--sizes takes T,N,H triples of positive ints (e.g. 100,32,256), got {text!r}")
    return size  # type: ignore[return-value]


def _families(text: str) -> list[str]:
    families = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in families if f not in bench.FAMILIES]
    if unknown or not families:
        raise argparse.ArgumentTypeError(
            f"--families takes a comma-separated subset of {','.join(bench.FAMILIES)}, "
            f"got {text!r}")
    return families


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnnkit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = commands.add_parser(
        "bench", help="time rnnkit against torch.nn and the reference loop",
        description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--quick", action="store_true",
                   help="one tiny size and 2 repeats: checks the command, not the speed")
    b.add_argument("--sizes", type=_size, nargs="+", metavar="T,N,H",
                   help="sizes to time (default: " +
                   " ".join(",".join(map(str, s)) for s in bench.FULL_SIZES) + ")")
    b.add_argument("--families", type=_families, default=list(bench.FAMILIES),
                   help="comma-separated subset of lstm,gru,rnn (default: all)")
    b.add_argument("--backend", choices=[x for x in BACKENDS if x != "reference"], default="auto",
                   help="rnnkit backend to time (default: auto)")
    b.add_argument("--repeats", type=_positive, default=7, help="timed repeats (median)")
    b.add_argument("--streaming-hidden", type=_positive, default=256,
                   help="hidden size of the single-step latency test (default 256)")
    b.add_argument("--memory-size", type=_size, metavar="T,N,H",
                   help="size of the training-step peak-memory comparison (default " +
                   ",".join(map(str, bench.MEMORY_SIZE)) + ")")
    b.add_argument("--no-memory", action="store_true", help="skip the peak-memory comparison")
    b.add_argument("--no-reference", action="store_true",
                   help="skip the (slow) reference loop peers")
    b.add_argument("--json", metavar="FILE", help="also write the results as JSON here")
    return parser


def run_bench(args: argparse.Namespace) -> int:
    sizes = args.sizes or (bench.QUICK_SIZES if args.quick else bench.FULL_SIZES)
    repeats = 2 if args.quick else args.repeats
    streaming_hidden = 16 if args.quick else args.streaming_hidden
    machine = bench.machine_description()
    print(f"rnnkit bench: torch {machine['torch']}, {machine['threads']} threads, "
          f"{machine['processor']}, median of {repeats}", flush=True)
    rows = bench.run_benchmarks(
        sizes, args.families, args.backend, repeats, streaming_hidden,
        with_reference=not args.no_reference,
        progress=lambda message: print(message, file=sys.stderr, flush=True))
    print(bench.format_table(rows))
    memory_rows = []
    if not args.no_memory:
        memory_size = args.memory_size or (
            bench.QUICK_MEMORY_SIZE if args.quick else bench.MEMORY_SIZE)
        for family in args.families:
            print(f"measuring {family} training-step memory at T,N,H = {memory_size} ...",
                  file=sys.stderr, flush=True)
            memory_rows += bench.benchmark_memory(family, memory_size, args.backend)
        print()
        print(bench.format_memory_table(memory_rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            handle.write(bench.rows_to_json(rows, memory_rows))
        print(f"wrote {args.json}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        return run_bench(args)
    raise AssertionError(f"unhandled command {args.command}")  # argparse rejects unknown ones


if __name__ == "__main__":
    sys.exit(main())
