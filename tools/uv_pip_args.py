#!/usr/bin/env python3
"""Print the `uv pip install` options that say what this machine's pip configuration says.

`make install` installs with uv (seconds, where pip takes over a minute and byte-compiles on one
core), but uv does not read pip's configuration files or PIP_* variables: package mirrors, local
wheel folders and constraint files set up for pip would be ignored. This reads them through
`pip config list` and prints the same settings as uv options (nothing on a machine without any,
where uv uses PyPI as pip would). Index order follows pip's: the best version across every index.
"""

from __future__ import annotations

import shlex
import subprocess
import sys

# pip setting -> uv option (each value of a space-separated list becomes one option)
OPTIONS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
           "constraint": "--constraint"}


def pip_settings() -> dict[str, list[str]]:
    """pip's effective settings (files and PIP_* variables), setting name -> values."""
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    settings: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]  # "global.find-links", ":env:.find-links"
        values = shlex.split(value)[0].split() if value.strip() else []
        settings.setdefault(name, [])
        settings[name] += [v for v in values if v not in settings[name]]
    return settings


def uv_args(settings: dict[str, list[str]]) -> list[str]:
    args = ["--index-strategy", "unsafe-best-match"]  # pip picks the best version over all indexes
    for name, option in OPTIONS.items():
        for value in settings.get(name, []):
            args += [option, value]
    if settings.get("no-index", ["0"])[0].lower() in ("1", "true", "yes", "on"):
        args.append("--no-index")
    if settings.get("cert"):
        args.append("--native-tls")  # pip was pointed at a CA bundle: trust the system's store as well
    return args


if __name__ == "__main__":
    print(shlex.join(uv_args(pip_settings())))
