"""The Python packages a lent GPU machine lacks for rayscale, as wheels in `.whl/` for benchmarks/gpu_check.sh.

That machine (the device tool's nvidia-h200 kind) has PyTorch, NumPy, pandas, pyarrow and most of what rayscale
needs under its own Python 3.12, but no Ray, and it reaches no package registry: the wheels travel with the
working tree, which may hold 64 MiB in all. Ray's wheel alone is ~79 MB, a third of it `ray/jars/` (Ray's
Java API, which a Python program never loads): the copy made here leaves that and the dashboard's JavaScript
source maps out. Of Ray's own dependencies only those the machine lacks are fetched, less the ones nothing
in a training run imports (virtualenv and its needs: runtime environments with pip or uv; py-spy: the
dashboard's on-demand stack dumps; cryptography: Google Cloud credentials).

    python -m benchmarks.gpu_wheels [--python-version 3.12] [--dest .whl]

Run it here (it downloads from PyPI), then in the device tool's `run` carry `.whl` (benchmarks/README.md).
Exit 2 with a message when the wheels would not fit the 64 MiB a call may carry.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What the nvidia-h200 image holds among Ray's dependencies (the device tool's KINDS.md, read 2026-11-17).
ON_THE_MACHINE = frozenset("""
aiohappyeyeballs aiohttp aiosignal attrs certifi charset-normalizer click filelock frozenlist fsspec grpcio idna
msgpack multidict numpy packaging pandas prometheus-client propcache protobuf pyarrow python-dateutil pyyaml
requests six typing-extensions urllib3 wrapt yarl
""".split())
NOT_IMPORTED = frozenset("virtualenv distlib platformdirs python-discovery py-spy cryptography cffi pycparser".split())
LEFT_OUT_OF_RAY = (re.compile(r"^ray/jars/"), re.compile(r"\.js\.map$"))
CARRY_LIMIT = 64 * 2**20
TREE_ALLOWANCE = 4 * 2**20  # the working tree travels in the same 64 MiB
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_27_x86_64", "manylinux_2_28_x86_64",
             "manylinux1_x86_64", "manylinux_2_5_x86_64")


def project_name(wheel: str) -> str:
    """A wheel file's distribution name, normalised as PyPI compares them."""
    return re.sub(r"[-_.]+", "-", wheel.split("-")[0]).lower()


def ray_requirement() -> str:
    """The Ray this project pins (requirements.txt), with the extras rayscale uses."""
    for line in (REPO / "requirements.txt").read_text().splitlines():
        if line.startswith("ray["):
            return line.split("#")[0].strip()
    raise SystemExit("benchmarks.gpu_wheels: requirements.txt pins no ray[...] version")


def without(wheel: Path, patterns) -> Path:
    """A copy of `wheel` without the members matching `patterns`, in place (pip reads RECORD's list, but does
    not require every file in it to be there)."""
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as out:
        for member in source.infolist():
            if not any(p.search(member.filename) for p in patterns):
                out.writestr(member, source.read(member.filename))
    slim.replace(wheel)
    return wheel


def download(requirement: str, python_version: str, into: Path) -> list[Path]:
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--implementation", "cp",
               "--python-version", python_version, "-d", str(into), requirement]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    subprocess.run(command, check=True)
    return sorted(into.glob("*.whl"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python-version", default="3.12", help="the device's Python (default 3.12)")
    parser.add_argument("--dest", type=Path, default=REPO / ".whl", help="where the wheels go (default .whl)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        fetched = download(ray_requirement(), args.python_version, Path(scratch))
        kept = [w for w in fetched if project_name(w.name) not in ON_THE_MACHINE | NOT_IMPORTED]
        if args.dest.exists():
            shutil.rmtree(args.dest)
        args.dest.mkdir(parents=True)
        for wheel in kept:
            copied = Path(shutil.copy2(wheel, args.dest / wheel.name))
            if project_name(wheel.name) == "ray":
                without(copied, LEFT_OUT_OF_RAY)
    total = sum(w.stat().st_size for w in args.dest.glob("*.whl"))
    for wheel in sorted(args.dest.glob("*.whl")):
        print(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
    print(f"{total / 2**20:7.2f} MiB in {args.dest} ({len(kept)} wheels, Python {args.python_version})")
    if total > CARRY_LIMIT - TREE_ALLOWANCE:
        print(f"benchmarks.gpu_wheels: {total / 2**20:.1f} MiB of wheels leave too little of the "
              f"{CARRY_LIMIT // 2**20} MiB a device call carries for the working tree", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
