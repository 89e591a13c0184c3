"""The built wheel, installed non-editable into a fresh virtual environment, trains from outside the repository.

What an editable install cannot show: that the wheel holds every module and data file the package reads (the
packaged configs, the shipped texts), and that nothing resolves through the source tree. The wheel is built from
a copy of the files git would check out (an in-place build would leave `build/` and `*.egg-info` in the repository,
and setuptools' stale `build/lib` could put modules deleted since into the wheel). The new environment reuses the
dependencies already installed in the running one through a `.pth` line, added only after the wheel is installed,
so pip never sees the repository's editable `big_vision_lite` there and nothing is downloaded (`--no-index`).
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PIP_ENV = {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc


def _checkout_files() -> list[str]:
    """The repository's files as a clone would have them, plus new files git does not ignore."""
    listed = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO).stdout
    return [name for name in listed.split("\0") if name and (REPO / name).is_file()]  # staged deletions are gone


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory) -> dict:
    """Builds the wheel, makes a venv, installs the wheel with --no-deps, then links the running env's packages."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    for name in _checkout_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    env = dict(os.environ, **PIP_ENV)
    env.pop("PYTHONPATH", None)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
          str(root / "dist"), str(source)], env=env)
    (wheel,) = (root / "dist").glob("big_vision_lite-*.whl")

    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    # The running environment's pip installs into the new interpreter (`--python`); the new env has no pip.
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
         env=env)
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    deps = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    # A plain path line: the directory is appended to sys.path, but its own .pth files (the repository's editable
    # finder among them) are not run, and the venv's own site-packages comes first.
    (site / "_bvl_test_dependencies.pth").write_text("".join(f"{d}\n" for d in deps))
    run_env = {k: v for k, v in env.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return dict(root=root, source=source, wheel=wheel, venv=venv, python=python, site=site, env=run_env, deps=deps)


def test_wheel_holds_every_package_file(wheel_env):
    """Every module and data file under big_vision_lite/ in the checkout is in the wheel, the packaged configs and
    shipped texts included, and the `bvl` entry point is declared."""
    with zipfile.ZipFile(wheel_env["wheel"]) as whl:
        names = set(whl.namelist())
        entry_points = next(whl.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    package = wheel_env["source"] / "big_vision_lite"
    wanted = {p.relative_to(wheel_env["source"]).as_posix() for p in package.rglob("*")
              if p.is_file() and "__pycache__" not in p.parts}
    assert {"big_vision_lite/configs/siglip_shapes.py", "big_vision_lite/configs/paligemma_shapes_caption.py",
            "big_vision_lite/data/texts/kjv_genesis_1-6.txt"} <= wanted
    assert sorted(wanted - names) == []
    assert "bvl = big_vision_lite.cli:main" in entry_points


def test_installed_package_is_the_wheel(wheel_env, tmp_path):
    """From a directory outside the repository, the new interpreter imports big_vision_lite (and its CLI and
    training loop) from the new venv, never from the repository or its editable install. (A folder without
    `__init__.py` imports as a namespace package with no `__file__`: its `__path__` is checked instead.)"""
    probe = ("import json, sys, big_vision_lite.cli, big_vision_lite.train.loop, big_vision_lite.train.config as c\n"
             "mods = [m.__file__ or next(iter(m.__path__)) for n, m in sys.modules.items()\n"
             "        if n.startswith('big_vision_lite')]\n"
             "print(json.dumps(dict(modules=mods, configs=str(c.PACKAGED_CONFIG_DIR), path=sys.path)))")
    found = json.loads(_run([str(wheel_env["python"]), "-c", probe], cwd=tmp_path, env=wheel_env["env"]).stdout)
    installed = wheel_env["site"] / "big_vision_lite"
    assert len(found["modules"]) > 3 and all(Path(f).is_relative_to(installed) for f in found["modules"]), found
    assert Path(found["configs"]) == installed / "configs"
    # No sys.path entry ('' is the working directory) is in the repository, bar the dependencies' site-packages.
    in_repo = [p for p in found["path"] if Path(p or tmp_path).resolve().is_relative_to(REPO)
               and p not in wheel_env["deps"]]
    assert not in_repo, found["path"]
    bvl = wheel_env["venv"] / "bin" / "bvl"
    assert bvl.read_text().splitlines()[0] == f"#!{wheel_env['python']}"


def test_bvl_train_siglip_shapes_from_the_wheel(wheel_env, tmp_path):
    """`bvl train siglip_shapes --set total_steps=2` with the wheel's `bvl`, run from a temporary directory with
    its own cache: exit 0, metrics for step 2 and a checkpoint of step 2 in the workdir."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = dict(wheel_env["env"], BVL_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([str(wheel_env["venv"] / "bin" / "bvl"), "train", "siglip_shapes", "--set", "total_steps=2",
                           "--workdir", "W"], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    workdir = cwd / "W"
    assert "trained 2 steps" in proc.stdout
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert any(r["step"] == 2 and "loss" in r for r in records), records
    assert (workdir / "checkpoints" / "2").is_dir()
