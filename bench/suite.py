"""The whole benchmark suite in one run: every script of bench/ at one size, one after the other.

    python bench/suite.py                     # 256 px, writes the weights first if missing
    python bench/suite.py --size 512 --steps 20 --log suite-512.txt

Runs, each printing its own ratios against diffusers (or the machine's peak):
``checkpoints.py --preset sd1`` (skipped when the files exist), ``compare.py`` on the single file with the
fast paths and memory modes as extra sides, ``compare.py`` on the diffusers folder (load only matters
there: 2 steps), ``roofline.py``, ``memory.py`` (decode of twice ``--size``, tiles of ``--size``) and
``train_memory.py``. Everything printed goes to the terminal and to ``--log``, with the date, the commit,
the machine and each step's wall time, so an entry of RESULTS.md can be written from it.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
DEFAULT_OUT = Path("~/.cache/sfumato/bench").expanduser()
FAST = ["deepcache=3", "int8=unet", "int8=unet+vae,deepcache=3", "int8=unet,tome=0.5", "memory.offload=sequential"]


def steps(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    name = "tiny-sd1-fp32" if args.tiny else "sd1-fp32"
    single, folder = args.out / f"{name}.safetensors", args.out / name
    fast = [a for f in FAST for a in ("--fast", f)]
    return [
        ("weights", ["checkpoints.py", "--preset", "sd1", "--layout", "both", "--out", str(args.out)]
         + (["--tiny"] if args.tiny else [])),
        ("compare single file", ["compare.py", "--model", str(single), "--size", str(args.size), "--steps",
                                 str(args.steps), *fast]),
        ("compare folder", ["compare.py", "--model", str(folder), "--size", str(args.size), "--steps", "2"]),
        ("roofline", ["roofline.py", "--model", str(single), "--size", str(args.size), "--repeats", "2"]),
        ("memory", ["memory.py", "--model", str(folder), "--size", str(2 * args.size), "--tile", str(args.size)]),
        ("train memory", ["train_memory.py", "--model", str(folder), "--size", str(args.size), "--steps", "2"]),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the random-weight checkpoints live")
    ap.add_argument("--only", help="comma-separated step names to run (default: all)")
    ap.add_argument("--tiny", action="store_true", help="tiny random configs (for tests)")
    ap.add_argument("--log", type=Path, default=Path("suite.txt"))
    args = ap.parse_args(argv)
    plan = steps(args)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {name for name, _ in plan}
        if unknown:
            ap.error(f"--only: unknown steps {sorted(unknown)}; known: {', '.join(n for n, _ in plan)}")
        plan = [(n, c) for n, c in plan if n in wanted]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=BENCH).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    t_all = time.perf_counter()
    failed: list[str] = []
    with args.log.open("w") as log:
        def say(text: str) -> None:
            print(text, flush=True)
            log.write(text + "\n")
            log.flush()

        say(f"# sfumato bench suite, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit}, "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS="
            f"{os.environ.get('OMP_NUM_THREADS', 'unset')}")
        for name, cmd in plan:
            say(f"\n## {name}: python bench/{' '.join(cmd)}")
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, str(BENCH / cmd[0]), *cmd[1:]], capture_output=True, text=True)
            say(out.stdout.rstrip())
            if out.returncode:
                failed.append(name)
                say(f"FAILED (exit {out.returncode}):\n{out.stderr[-3000:]}")
            say(f"({time.perf_counter() - t0:.0f} s)")
        say(f"\nsuite: {time.perf_counter() - t_all:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
