"""A minimal Docker image holding this machine's Python (standard library only), made with
`docker import` from the files themselves: the docker sandbox backend's tests need an image with
a Python, and this machine cannot pull one. The interpreter keeps its path, so it finds its
standard library and libpython as it does here."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tarfile

IMAGE = "composer-sandbox-python:test"
SKIP_DIRS = {"site-packages", "test", "idlelib", "tkinter", "ensurepip", "lib2to3", "turtledemo", "__pycache__"}


def python_path() -> str:
    return os.path.realpath(sys.executable)


def build_image() -> str:
    """IMAGE, imported unless it is already there."""
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True).returncode == 0:
        return IMAGE
    prefix = os.path.realpath(sys.base_prefix)
    stdlib = sysconfig.get_path("stdlib", vars={"installed_base": prefix, "base": prefix})
    dynload = os.path.join(stdlib, "lib-dynload")
    files = {python_path()}
    for path in (python_path(), *(os.path.join(dynload, name) for name in os.listdir(dynload))):
        files.update(_shared_libraries(path))
    files.update(os.path.join(prefix, "lib", n) for n in os.listdir(os.path.join(prefix, "lib")) if "libpython" in n)
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        files.update(os.path.join(root, name) for name in names)
    importer = subprocess.Popen(["docker", "import", "-", IMAGE], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    with tarfile.open(fileobj=importer.stdin, mode="w|") as tar:
        made: set[str] = set()
        for path in sorted(files):
            parts = path.strip("/").split("/")
            for depth in range(1, len(parts)):
                directory = "/".join(parts[:depth])
                if directory not in made:
                    made.add(directory)
                    tar.addfile(_directory(directory, 0o755))
            info = tar.gettarinfo(os.path.realpath(path), arcname=path.strip("/"))
            info.uid = info.gid = 0
            with open(os.path.realpath(path), "rb") as handle:
                tar.addfile(info, handle)
        for directory in ("work", "tmp"):
            tar.addfile(_directory(directory, 0o1777))
    importer.stdin.close()
    if importer.wait() != 0:
        raise RuntimeError("docker import failed")
    return IMAGE


def _directory(name: str, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, mode
    return info


def _shared_libraries(path: str) -> list[str]:
    out = subprocess.run(["ldd", path], capture_output=True, text=True).stdout
    return [line.split("=>")[-1].split("(")[0].strip() for line in out.splitlines() if "/" in line]
