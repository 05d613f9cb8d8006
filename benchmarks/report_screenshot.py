"""A PNG of the run report (reports/report.html, tasks_mtl/report.py) by headless Chromium, for a quick look
at the page as a browser draws it (a pull request, a chat message). Builds the report first when there is none.

Chromium is not a dependency of the project: when /usr/bin/chromium (or --chromium) is absent the script says
so in its JSON line and exits 0. Chromium runs with a fresh profile directory and no background traffic.

Prints one JSON line: {"screenshot": path, "bytes": n}, or {"screenshot": null, "chromium": "absent", ...}.

    python benchmarks/report_screenshot.py [--params params.yaml] [--profile NAME] [--out reports/report.png]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from tasks_mtl.config import load_config

CHROMIUM = Path("/usr/bin/chromium")
QUIET_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--profile", default=None)
    parser.add_argument("--out", default=None, help="PNG to write (default: <reports_dir>/report.png)")
    parser.add_argument("--chromium", default=str(CHROMIUM), help="the Chromium binary")
    parser.add_argument("--size", default="1200,2400", help="window size WIDTH,HEIGHT in pixels")
    args = parser.parse_args(argv)

    chromium = Path(args.chromium)
    if not chromium.is_file():
        line = {"screenshot": None, "chromium": "absent", "looked_for": str(chromium)}
        print(json.dumps(line))
        return line

    cfg = load_config(args.params if Path(args.params).is_file() else None, profile=args.profile)
    report = cfg.path(cfg.reports_dir) / "report.html"
    if not report.exists():
        from tasks_mtl.report import write_report

        write_report(cfg)
    out = Path(args.out).resolve() if args.out else report.with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)  # a PNG left from an earlier call must not pass for this one
    with tempfile.TemporaryDirectory(prefix="mtl-chromium-") as profile_dir:
        command = [str(chromium), *QUIET_FLAGS, f"--user-data-dir={profile_dir}", f"--screenshot={out}",
                   f"--window-size={args.size}", report.resolve().as_uri()]
        done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    if done.returncode != 0 or not out.exists():
        line = {"screenshot": None, "error": f"chromium exited {done.returncode}",
                "stderr": done.stderr.strip().splitlines()[-3:]}
        print(json.dumps(line))
        sys.exit(1)
    line = {"screenshot": str(out), "bytes": out.stat().st_size}
    print(json.dumps(line))
    return line


if __name__ == "__main__":
    main()
