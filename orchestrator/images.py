"""Building (or reusing) the trainer image through the Docker SDK.

The image carries a label with a hash of everything the Dockerfile copies in, so an unchanged
tree reuses the image without sending the (wheelhouse-sized) build context to the daemon.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import docker
from docker.models.images import Image

DEFAULT_IMAGE = "composer-replication:latest"
GPU_IMAGE = "composer-replication:gpu"  # CUDA torch from the index, as compose/gpu.yml builds it
DEFAULT_BASE_IMAGE = "python:3.11-slim"
SOURCE_LABEL = "composer-replication.source-hash"
# Written by compose/provision.sh: the base it chose (an offline debootstrap one here).
BASE_IMAGE_RECORD = Path("compose/.cache/base-image")
IMAGE_INPUTS = ("Dockerfile", ".dockerignore", "pyproject.toml", "trainer", "orchestrator", "configs")


class ImageBuildError(RuntimeError):
    pass


def image_identity(image: Image) -> str:
    """ "<image id> source <source hash>": what a machine joining a run shows the coordinator
    (orchestrator.coordinator.same_image compares two)."""
    return f"{image.id} source {image.labels.get(SOURCE_LABEL) or 'unlabelled'}"


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def recorded_base_image(root: Path) -> str:
    record = root / BASE_IMAGE_RECORD
    return record.read_text().strip() if record.exists() else DEFAULT_BASE_IMAGE


def source_hash(root: Path, base_image: str, gpu: bool = False) -> str:
    """Hash of the image's inputs: the copied files, the wheel names, the base image and flavour."""
    digest = hashlib.sha256(f"{base_image} gpu={gpu}".encode())
    files = []
    for name in IMAGE_INPUTS:
        path = root / name
        files += sorted(path.rglob("*")) if path.is_dir() else [path]
    files += sorted((root / "wheelhouse").glob("*.whl"))
    for path in files:
        if not path.is_file() or "__pycache__" in path.parts or path.suffix == ".pyc":
            continue
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.name.encode() if path.suffix == ".whl" else path.read_bytes())
    return digest.hexdigest()[:16]


def ensure_image(
    client: docker.DockerClient,
    *,
    tag: str = DEFAULT_IMAGE,
    base_image: str | None = None,
    rebuild: bool = False,
    gpu: bool = False,
    log: Callable[[str], None] = print,
) -> Image:
    """Returns the trainer image, building it when it is missing, stale, or `rebuild` is set.

    `gpu` installs the dependencies from the index even when there is a wheelhouse, whose torch
    is the CPU build.
    """
    root = repo_root()
    base_image = base_image or recorded_base_image(root)
    wanted = source_hash(root, base_image, gpu)
    try:
        image = client.images.get(tag)
        if not rebuild and image.labels.get(SOURCE_LABEL) == wanted:
            log(f"image {tag}: up to date ({wanted})")
            return image
    except docker.errors.ImageNotFound:
        pass
    try:
        client.images.get(base_image)
    except docker.errors.ImageNotFound:
        try:
            client.images.pull(base_image)
        except docker.errors.APIError as error:
            raise ImageBuildError(
                f"base image {base_image} is not here and cannot be pulled ({error.explanation}); "
                "`bash compose/provision.sh --image-only` builds one offline"
            ) from error
    log(f"image {tag}: building on {base_image}")
    tail: list[str] = []
    for chunk in client.api.build(
        path=str(root),
        tag=tag,
        buildargs={"BASE_IMAGE": base_image, "WHEELHOUSE": "off" if gpu else "auto"},
        labels={SOURCE_LABEL: wanted},
        rm=True,
        forcerm=True,
        decode=True,
    ):
        if "error" in chunk:
            raise ImageBuildError(f"docker build of {tag} failed: {chunk['error'].strip()}\n" + "".join(tail[-20:]))
        text = chunk.get("stream", "")
        tail.append(text)
        if text.startswith("Step "):
            log(text.rstrip())
    image = client.images.get(tag)
    client.images.prune(filters={"dangling": True, "label": SOURCE_LABEL})  # the builds this one replaced
    log(f"image {tag}: built, {image.attrs['Size'] / 2**20:.0f} MiB")
    return image
