"""The real compiler's resource usage of every kernel of the CUDA backend, for the CUDA emulator's
launch checks: each csrc/cuda/*.cu is compiled by nvcc for one architecture (sm_90a) with ptxas
reporting each entry function's registers per thread and static shared memory, and the table is
written as lines of `registers<TAB>static shared bytes<TAB>demangled kernel name` (the emulator
finds its own kernels by their demangled names; nvcc's anonymous namespaces demangle as g++'s).

    python kernel_resources.py OUT.tsv NVCC ARCH -I... -- SOURCE.cu...
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

ENTRY = re.compile(r"Compiling entry function '(\w+)' for")
REGISTERS = re.compile(r"Used (\d+) registers")
STATIC_SHARED = re.compile(r"(\d+) bytes smem")


def kernel_usage(nvcc: str, arch: str, flags: list[str], source: str) -> dict[str, tuple[int, int]]:
    """mangled name -> (registers, static shared bytes) of the entry functions of one source."""
    with tempfile.TemporaryDirectory() as scratch:
        result = subprocess.run([nvcc, f"-arch={arch}", "-cubin", "-o", str(Path(scratch) / "k.cubin"), "-std=c++17",
                                 "--expt-relaxed-constexpr", "-Xptxas", "-v", *flags, source],
                                capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"nvcc failed on {source}:\n{result.stderr}")
    usage, entry = {}, None
    for line in result.stderr.splitlines():
        if found := ENTRY.search(line):
            entry = found.group(1)
        elif entry and (registers := REGISTERS.search(line)):
            shared = STATIC_SHARED.search(line)
            usage[entry] = (int(registers.group(1)), int(shared.group(1)) if shared else 0)
            entry = None
    return usage


def main() -> None:
    out, nvcc, arch, *rest = sys.argv[1:]
    split = rest.index("--")
    flags, sources = rest[:split], rest[split + 1 :]
    usage = {}
    for source in sources:
        usage.update(kernel_usage(nvcc, arch, flags, source))
    mangled = sorted(usage)
    demangled = subprocess.run(["c++filt"], input="\n".join(mangled), capture_output=True, text=True,
                               check=True).stdout.splitlines()
    lines = [f"{usage[m][0]}\t{usage[m][1]}\t{d}" for m, d in zip(mangled, demangled)]
    Path(out).write_text("\n".join(sorted(lines, key=lambda line: line.split("\t")[2])) + "\n")


if __name__ == "__main__":
    main()
