"""Read `nvcc -Xptxas -v` output on stdin: print one line per kernel (registers, spills) and fail
when any kernel spills registers or uses a stack frame (a register-pressure regression)."""

import re
import sys

entry = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
frame = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
regs = re.compile(r"Used (\d+) registers")

kernels, bad, current = [], [], None
for line in sys.stdin:
    if m := entry.search(line):
        current = {"name": m.group(1), "arch": m.group(2)}
        kernels.append(current)
    elif current is not None and (m := frame.search(line)):
        current["frame"], current["stores"], current["loads"] = map(int, m.groups())
    elif current is not None and (m := regs.search(line)):
        current["regs"] = int(m.group(1))
    elif not line.startswith("ptxas info"):
        print(line, end="")  # compiler errors and warnings
for k in kernels:
    print(
        f"  {k['arch']} regs={k.get('regs')} stack={k.get('frame')} "
        f"spill_stores={k.get('stores')} spill_loads={k.get('loads')} {k['name']}"
    )
    if k.get("frame") or k.get("stores") or k.get("loads") or "regs" not in k:
        bad.append(k["name"])
if not kernels:
    sys.exit("check_ptxas: no kernels found in the ptxas output")
if bad:
    sys.exit(f"check_ptxas: {len(bad)} kernels spill or use stack: {bad}")
print(
    f"check_ptxas: {len(kernels)} kernels, max {max(k['regs'] for k in kernels)} registers, "
    "no spills"
)
