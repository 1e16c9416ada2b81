"""What every benchmark shares: a description of the machine, and writing its own section of
docs/BENCHMARKS.md (between `<!-- NAME:start -->` and `<!-- NAME:end -->`) without touching the others."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "docs" / "BENCHMARKS.md"


def versions(*packages: str) -> str:
    out = []
    for name in packages:
        try:
            out.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            out.append(f"{name} (not installed)")
    return ", ".join(out)


def machine(*packages: str) -> str:
    """CPU model and count, memory, OS, Python and the given packages' versions, and the load now."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    text = (f"{os.cpu_count()} CPU cores ({cpu}), {mem:.0f} GiB, no GPU, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")
    if packages:
        text += ", " + versions(*packages)
    return text + f"; load average {os.getloadavg()[0]:.2f} at the start"


def write_section(name: str, text: str, path: Path = BENCHMARKS) -> None:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    doc = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    if start in doc:
        head, rest = doc.split(start, 1)
        doc = head + start + "\n" + text + "\n" + end + rest.split(end, 1)[1]
    else:
        doc = doc.rstrip() + f"\n\n{start}\n{text}\n{end}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(doc, encoding="utf-8")
    os.replace(tmp, path)
