#!/usr/bin/env python3
"""Writes the Functions deployment zip: exactly the files the host needs, the binary 0755."""

import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (path inside the zip, source in the repository, mode)
ENTRIES = [
    ("host.json", "host.json", 0o644),
    ("token-broker", None, 0o755),
    ("function-token/function.json", "function-token/function.json", 0o644),
    ("function-invalidate/function.json", "function-invalidate/function.json", 0o644),
    ("function-health/function.json", "function-health/function.json", 0o644),
    ("function-rotation/function.json", "function-rotation/function.json", 0o644),
    ("broker.toml", "infra/broker.toml", 0o644),
]


def main(binary, output):
    with zipfile.ZipFile(output, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, source, mode in ENTRIES:
            data = Path(binary if source is None else ROOT / source).read_bytes()
            info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3  # Unix, so the mode bits below are honoured
            info.external_attr = (0o100000 | mode) << 16
            archive.writestr(info, data)
    size = Path(output).stat().st_size
    print(f"{output}: {len(ENTRIES)} entries, {size / 1024 / 1024:.1f} MiB")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
