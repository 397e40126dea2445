"""The built wheel works on its own: installed into a fresh venv and run from another directory.

The venv reaches the already-installed heavy dependencies (torch, transformers...) through a
path entry, not through system site-packages, so the editable install of this checkout
(a meta-path finder started by a .pth file) cannot shadow the wheel under test.
"""

from __future__ import annotations

import json
import re
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from conftest import REPO, build_tokenizer, write_jsonl


def _run(*args, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result


def test_wheel_installs_and_runs_outside_the_repo(tmp_path):
    dist = tmp_path / "dist"
    _run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", dist, REPO)
    wheel = next(dist.glob("rlkit-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "rlkit/commands/sft.py" in names and "rlkit/templates/chatml.jinja" in names
    assert "rlkit/demo/data/sft.jsonl" in names
    assert not any(n.startswith("commands/") or n.startswith("templates/") for n in names)

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    purelib = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").stdout.strip())
    deps = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib"), *site.getsitepackages()}
    (purelib / "host_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    _run(python, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", wheel)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run(python, "-c", "import rlkit, rlkit.commands; print(rlkit.__file__)", cwd=elsewhere).stdout.strip()
    assert where.startswith(str(venv)), where
    assert not (purelib / "commands").exists() and not (purelib / "templates").exists()

    rlkit = venv / "bin" / "rlkit"
    assert "sft" in _run(rlkit, "--help", cwd=elsewhere).stdout
    assert _run(rlkit, "--version", cwd=elsewhere).stdout.startswith("rlkit ")

    tokenizer_dir = tmp_path / "tok"
    build_tokenizer(chat_template=None).save_pretrained(tokenizer_dir)
    data = write_jsonl(elsewhere / "d.jsonl", [{"prompt": "Hi?", "completion": "Hello."}] * 3)
    packed = _run(
        rlkit,
        "pack",
        data,
        "--tokenizer",
        tokenizer_dir,
        "--template",
        "tulu",
        "-o",
        "packed",
        "--max-length",
        "64",
        cwd=elsewhere,
    )
    assert packed.stdout.strip() == "packed"
    meta = json.loads((elsewhere / "packed" / "rlkit_pack.json").read_text())
    assert meta["counts"]["examples"] == 3 and meta["template"]["name"] == "tulu"


def test_editable_build_says_nothing_but_installs_the_package_map(tmp_path):
    """`pip install -e .` shows the backend's warnings; setuptools' own backend warns on every
    editable build of this layout ("InformationOnly: Editable installation ..."), ours says
    nothing, and the editable wheel still maps rlkit, rlkit.commands and rlkit.templates to their folders."""
    build = (
        "import sys; sys.path.insert(0, 'build_backend'); import rlkit_build; "
        f"print(rlkit_build.build_editable({str(tmp_path)!r}))"
    )
    result = _run(sys.executable, "-W", "always", "-c", build, cwd=REPO)
    warned = re.findall(r"^\S+\.py:\d+: \w+: .*$", result.stderr, re.M)  # how Python prints a warning
    assert not warned, result.stderr
    wheel = zipfile.ZipFile(tmp_path / result.stdout.strip().splitlines()[-1])
    mapping = wheel.read(next(n for n in wheel.namelist() if n.endswith("finder.py"))).decode()
    for package, folder in [("rlkit", "rlkit"), ("rlkit.commands", "commands"), ("rlkit.templates", "templates")]:
        assert f"'{package}': '{REPO / folder}'" in mapping, mapping
