"""How long `qlora-trainer --help` and each subcommand's `--help` take, as a user runs them (a new process each).

    python benchmarks/help_latency.py [--repeat 5] [--out results.json]

Prints the median wall time of each command over --repeat runs.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

COMMANDS = [["--help"], ["--version"], *[[name, "--help"] for name in
                                         ("train", "plan-memory", "bench", "merge", "generate")]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", help="JSON file for the results")
    args = parser.parse_args()
    results = {}
    for command in COMMANDS:
        times = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "qlora_trainer", *command], check=True, capture_output=True)
            times.append(time.perf_counter() - started)
        results[" ".join(command)] = round(statistics.median(times), 3)
        print(f"qlora-trainer {' '.join(command):<22} {results[' '.join(command)]:.3f} s (median of {args.repeat})")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"python": sys.version.split()[0], "median_seconds": results}, handle, indent=1)


if __name__ == "__main__":
    main()
