#!/usr/bin/env python3
"""Writes deploy/hot-text/agent.order from deploy/hot-text.sh's trace runs.

    order.py TRACE_BINARY OUT PAGES...

TRACE_BINARY is the agent linked with trace.ld (every function on its own 64 KiB) and not stripped; each PAGES file
is what `bench rss` wrote with FIELDLINK_BENCH_TEXT_PAGES (the code pages mapped in that agent). A function is hot
when a page of it was mapped in any run. OUT lists the hot functions' symbols in the trace binary's order (the link
order), then the `warm` patterns: code the traces did not run but production may (TLS, Modbus, our own crates'
functions added since the trace), kept next to the hot block rather than spread through the rest.
"""
import os
import subprocess
import sys

PAGE = 4096
# Input-section globs laid out right after the hot functions, in this order.
WARM = [
    ".text._ZN*fieldlink_*",     # our crates: functions added or renamed since the trace
    ".text._ZN*rustls*", ".text._ZN*webpki*", ".text._ZN4ring*", ".text.ring_core_*",  # TLS (Kinesis, brokers)
    ".text._ZN*tokio_modbus*",   # Modbus sources (the trace reads MQTT only)
    ".text",                     # code without function sections: the C library, assembly (ring's ciphers)
]


def symbols(binary):
    out = subprocess.run(["nm", "-S", "-n", "--defined-only", binary], check=True,
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        f = line.split()
        if len(f) == 4 and f[2] in "tTwW":
            yield int(f[0], 16), int(f[1], 16), f[3]


def present(paths, binary):
    pages = set()
    for path in paths:
        for line in open(path):
            if line.startswith("map "):
                if os.path.basename(line.split()[2]) != os.path.basename(binary):
                    sys.exit(f"order.py: {path} maps {line.split()[2]}, not {binary}")
                continue
            pages.add(int(line, 16) // PAGE)
    return pages


def main():
    binary, out, runs = sys.argv[1], sys.argv[2], sys.argv[3:]
    if not runs:
        sys.exit(__doc__)
    with open(binary, "rb") as f:
        if f.read(18)[16:18] != b"\x02\x00":
            sys.exit("order.py: the trace binary must be a static non-PIE executable (ET_EXEC)")
    pages = present(runs, binary)
    hot, seen, total = [], set(), 0
    for addr, size, name in symbols(binary):
        total += size
        if name in seen or addr % 65536:
            continue  # a repeated name, or code not on its own 64 KiB (no function section: see WARM)
        if any(p in pages for p in range(addr // PAGE, (addr + max(size, 1) - 1) // PAGE + 1)):
            hot.append((name, size))
            seen.add(name)
    with open(out, "w") as o:
        o.write("# The agent's hot functions: written by deploy/hot-text.sh, read by agent/build.rs. Do not edit.\n")
        for line in os.environ.get("HOT_TEXT_PROVENANCE", "").splitlines():
            o.write(f"# {line}\n")
        o.write(f"# {len(hot)} functions, {sum(s for _, s in hot)} bytes of {total} bytes of code\n")
        for name, _ in hot:
            o.write(name + "\n")
        for pattern in WARM:
            o.write(f"warm {pattern}\n")
    print(f"order.py: {len(hot)} hot functions, {sum(s for _, s in hot) / 1024:.0f} KiB of "
          f"{total / 1024:.0f} KiB, from {len(pages)} pages in {len(runs)} run(s)")


if __name__ == "__main__":
    main()
