"""launch/python_env.sh: which Python set-up, the tests and the launch scripts use.

A fresh Debian/Ubuntu machine's python3 is "externally managed" (PEP 668: pip refuses to install into it). The
test builds such an interpreter without touching the real one: the real binary started with PYTHONHOME pointing at
a folder whose lib/pythonX.Y links to the real standard library and holds an EXTERNALLY-MANAGED marker.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYTHON_ENV = REPO / "launch" / "python_env.sh"
BASE = Path(getattr(sys, "_base_executable", sys.executable)).resolve()


def resolve(checkout: Path, path: str, **env: str) -> tuple[str, str]:
    """(interpreter chosen, stderr) of lasers_resolve_python in a clean environment with the given PATH."""
    clean = {"PATH": path, "HOME": os.environ.get("HOME", "/root"), **env}
    script = f'source "{PYTHON_ENV}" && lasers_resolve_python "{checkout}" && echo "$LASERS_PY"'
    proc = subprocess.run(["bash", "-c", script], env=clean, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip(), proc.stderr


def fake_python(folder: Path, managed: bool) -> Path:
    """A `python3` on a private PATH: the real interpreter with its own prefix, optionally externally managed."""
    home = folder / "home"
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    stdlib = home / "lib" / version
    stdlib.mkdir(parents=True)
    real_stdlib = Path(sysconfig.get_paths(vars={"base": sys.base_prefix, "installed_base": sys.base_prefix})["stdlib"])
    for entry in real_stdlib.iterdir():
        (stdlib / entry.name).symlink_to(entry)
    if managed:
        (stdlib / "EXTERNALLY-MANAGED").write_text("[externally-managed]\nError=use a virtual environment\n")
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "python3"
    wrapper.write_text(f'#!/bin/sh\nPYTHONHOME="{home}" exec "{BASE}" "$@"\n')
    wrapper.chmod(0o755)
    return bin_dir


def test_externally_managed_python_gets_a_venv_in_the_checkout(tmp_path):
    bin_dir = fake_python(tmp_path / "system", managed=True)
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    chosen, said = resolve(checkout, f"{bin_dir}:/usr/bin:/bin")
    assert chosen == str(checkout / ".venv" / "bin" / "python")
    assert "externally managed" in said and f"{checkout}/.venv" in said
    probe = subprocess.run([chosen, "-c", "import sys, pip; print(sys.prefix != sys.base_prefix)"],
                           capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "True", probe.stderr  # a real venv, with pip to install into it
    again, said = resolve(checkout, f"{bin_dir}:/usr/bin:/bin")
    assert again == chosen and said == ""  # reused quietly


def test_a_python_that_is_not_managed_is_used_as_it_is(tmp_path):
    bin_dir = fake_python(tmp_path / "system", managed=False)
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    chosen, said = resolve(checkout, f"{bin_dir}:/usr/bin:/bin")
    assert chosen == str(bin_dir / "python3") and said == ""
    assert not (checkout / ".venv").exists()


@pytest.mark.parametrize("kind", ["VIRTUAL_ENV", "CONDA_PREFIX", "PYTHON"])
def test_an_active_environment_wins_over_everything(tmp_path, kind):
    bin_dir = fake_python(tmp_path / "system", managed=True)
    env_dir = tmp_path / "users-env"
    (env_dir / "bin").mkdir(parents=True)
    (env_dir / "bin" / "python").symlink_to(BASE)
    value = str(env_dir / "bin" / "python") if kind == "PYTHON" else str(env_dir)
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    chosen, said = resolve(checkout, f"{bin_dir}:/usr/bin:/bin", **{kind: value})
    assert chosen == str(env_dir / "bin" / "python") and said == ""
    assert not (checkout / ".venv").exists()  # the user's env is used as it is, nothing created
