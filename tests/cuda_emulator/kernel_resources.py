"""The real compiler's resource usage of every kernel of the CUDA backend, for the CUDA emulator's
launch checks: each csrc/cuda/*.cu is compiled by nvcc for one architecture (sm_90a) with ptxas
reporting each entry function's registers per thread and static shared memory, and its PTX kept
for the threads per block that __launch_bounds__ allows (.maxntid). The table is written as lines
of `registers<TAB>static shared bytes<TAB>max threads (0: no bound)<TAB>demangled kernel name`
(the emulator finds its own kernels by their demangled names; nvcc's anonymous namespaces
demangle as g++'s).

    python kernel_resources.py OUT.tsv NVCC ARCH -I... -- SOURCE.cu...
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

ENTRY = re.compile(r"Compiling entry function '(\w+)' for")
PTX_ENTRY = re.compile(r"\.entry (\w+)\(")
MAX_THREADS = re.compile(r"\.maxntid (\d+), (\d+), (\d+)")
REGISTERS = re.compile(r"Used (\d+) registers")
STATIC_SHARED = re.compile(r"(\d+) bytes smem")


def kernel_usage(nvcc: str, arch: str, flags: list[str], source: str) -> dict[str, tuple[int, int, int]]:
    """mangled name -> (registers, static shared bytes, max threads or 0) of one source's entry functions."""
    with tempfile.TemporaryDirectory() as scratch:
        result = subprocess.run([nvcc, f"-arch={arch}", "-cubin", "-o", str(Path(scratch) / "k.cubin"), "-std=c++17",
                                 "--expt-relaxed-constexpr", "--keep", "--keep-dir", scratch, "-Xptxas", "-v", *flags,
                                 source], capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"nvcc failed on {source}:\n{result.stderr}")
        max_threads, entry = {}, None
        for ptx in Path(scratch).glob("*.ptx"):
            for line in ptx.read_text().splitlines():
                if found := PTX_ENTRY.search(line):
                    entry = found.group(1)
                elif entry and (found := MAX_THREADS.search(line)):
                    max_threads[entry] = int(found.group(1)) * int(found.group(2)) * int(found.group(3))
    usage, entry = {}, None
    for line in result.stderr.splitlines():
        if found := ENTRY.search(line):
            entry = found.group(1)
        elif entry and (registers := REGISTERS.search(line)):
            shared = STATIC_SHARED.search(line)
            usage[entry] = (int(registers.group(1)), int(shared.group(1)) if shared else 0, max_threads.get(entry, 0))
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
    lines = ["\t".join(map(str, (*usage[m], d))) for m, d in zip(mangled, demangled)]
    Path(out).write_text("\n".join(sorted(lines, key=lambda line: line.split("\t")[3])) + "\n")


if __name__ == "__main__":
    main()
