"""What each container image of the three releases contains, as environments on this machine:
the test clusters' kubelet (tests/cluster/kubelet.py) runs a container from the environment of
its image. No container engine or registry is reachable here, so an image is replaced by what it
was built from:

- Python images get a virtual environment built from the same requirement files as the image
  (ours: `images/*/requirements.txt`; upstream: the frozen lists in the chart mirror), with the
  `mlaas` files the Dockerfile copies, and the image's files (e.g. /etc/jupyter) mounted where
  the Dockerfile puts them;
- the proxy runs configurable-http-proxy from the repository's npm packages; Traefik and the user
  scheduler's kube-scheduler are built at their images' versions from the Go module proxy
  (tests/cluster/build_images.sh); XCache runs Debian's xrootd, which is what its image installs.

Environments are cached by the hash of their inputs under $MLAAS_IMAGE_CACHE (default
/var/cache/mlaas-images as root, where pods' accounts can read them). Left out and said where it
matters: psycopg2 (the z2jh hub image's PostgreSQL driver builds against libpq; the test hub uses
SQLite) and CUDA (user-cuda runs as user-cpu: this machine has no GPU)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PYTHON = "/usr/bin/python3"  # the images' Python is 3.11 (python:3.11 bases), as is Debian's


def cache_root() -> Path:
    default = Path("/var/cache/mlaas-images") if os.geteuid() == 0 else Path.home() / ".cache" / "mlaas-images"
    return Path(os.environ.get("MLAAS_IMAGE_CACHE") or default)


def charts_mirror() -> Path:
    return Path(os.environ.get("MLAAS_CHARTS_DIR") or REPO.parent / "shared" / "charts")


@dataclass
class ImageEnv:
    """A built image: PATH directories, environment defaults (the Dockerfile's ENV), ENTRYPOINT
    and CMD, files it holds at given paths, its default user and group, its working directory."""

    path: list[str]
    env: dict[str, str] = field(default_factory=dict)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # container path -> host path
    user: int = 0
    group: int = 0
    workdir: str = "/"

    def which(self, program: str) -> str:
        """The program's file: found by name on the image's PATH (also for an absolute path such as
        /usr/local/bin/kube-scheduler, which is where the image would hold it)."""
        for d in self.path:
            if os.access(os.path.join(d, os.path.basename(program)), os.X_OK):
                return os.path.join(d, os.path.basename(program))
        if program.startswith("/") and os.access(program, os.X_OK):
            return program
        raise FileNotFoundError(f"{program} is not in the image (looked in {':'.join(self.path)})")


def _requirements(path: Path, drop: tuple[str, ...] = ()) -> list[str]:
    lines = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and " @ file:" not in line and not line.lower().startswith(drop):
            lines.append(line)
    return lines


def _venv(name: str, steps: list[list[str]], inputs: list[Path]) -> Path:
    """A virtual environment from pip install steps (each a list of pip arguments), cached by the
    hash of the steps and input files; built under a lock so parallel users wait for one build."""
    # by content: the same files in another checkout (another path) give the same environment
    digest = hashlib.sha256(repr([[os.path.basename(a) if a.startswith("/") else a for a in step] for step in steps]).encode())
    for f in inputs:
        digest.update(f.read_bytes())
    root = cache_root() / f"{name}-{digest.hexdigest()[:12]}"
    root.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(root.parent, 0o755)
    with open(root.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / ".built").exists():
            shutil.rmtree(root, ignore_errors=True)
            subprocess.run([PYTHON, "-m", "venv", str(root)], check=True)
            pip = [str(root / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
            for step in steps:
                r = subprocess.run([*pip, *step], capture_output=True, text=True)
                if r.returncode != 0:
                    raise RuntimeError(f"building the {name} image environment: pip {' '.join(step)}\n{r.stderr[-3000:]}")
            (root / ".built").touch()
    return root


def _install_mlaas(venv: Path, files: list[str] | None = None) -> None:
    """The repository's mlaas package as the Dockerfile copies it: the whole package (hub image,
    `pip install --no-deps`) or a few files (user images). Always this checkout's code."""
    site = next((venv / "lib").glob("python3*/site-packages"))
    target = site / "mlaas"
    shutil.rmtree(target, ignore_errors=True)
    src = REPO / "hub" / "mlaas"
    if files is None:
        shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        target.mkdir()
        for f in files:
            shutil.copy2(src / f, target / f)
    subprocess.run(["chmod", "-R", "a+rX", str(target)], check=True)


def hub_image() -> ImageEnv:
    mirror = charts_mirror()
    base = mirror / "z2jh-4.4.0-hub-image-requirements.txt"
    ours = REPO / "images" / "hub" / "requirements.txt"
    venv = _venv("hub", [["--no-deps", *_requirements(base, drop=("psycopg2",))], ["-r", str(ours)]], [base, ours])
    _install_mlaas(venv)
    return ImageEnv(path=[str(venv / "bin"), "/usr/bin", "/bin"], user=1000, group=1000, workdir="/srv/jupyterhub",
                    env={"HOME": "/home/jovyan"}, cmd=["jupyterhub", "--config", "/usr/local/etc/jupyterhub/jupyterhub_config.py"])


def tracking_image() -> ImageEnv:
    """The hub image's environment (the tracking service is mlaas.tracking) with MLflow's server
    at /opt/mlflow, where the image has it (built from images/tracking/requirements.txt)."""
    hub = hub_image()
    req = REPO / "images" / "tracking" / "requirements.txt"
    mlflow = _venv("mlflow", [["-r", str(req)]], [req])
    return ImageEnv(path=hub.path, user=1000, group=1000, workdir="/", env={"HOME": "/home/jovyan"},
                    cmd=["python3", "-m", "mlaas.tracking"], files={"/opt/mlflow": str(mlflow)})


def user_image() -> ImageEnv:
    req = REPO / "images" / "user-cpu" / "requirements.txt"
    venv = _venv("user-cpu", [["-r", str(req)]], [req])
    _install_mlaas(venv, ["__init__.py", "data.py"])
    return ImageEnv(path=[str(venv / "bin"), "/usr/bin", "/bin"], user=1000, group=100, workdir="/home/jovyan",
                    env={"HOME": "/home/jovyan", "SHELL": "/bin/bash"}, cmd=["jupyterhub-singleuser"],
                    files={"/etc/jupyter": str(REPO / "hub" / "user_env" / "jupyter")})


def _gateway_server_step() -> tuple[list[str], Path]:
    """Dask Gateway's server image, as pip arguments (its frozen list and the server itself)."""
    base = charts_mirror() / "dask-gateway-server-2026.3.0-image-requirements.txt"
    return ["--no-deps", *_requirements(base), "dask-gateway-server==2026.3.0"], base


def gateway_image() -> ImageEnv:
    server, base = _gateway_server_step()
    ours = REPO / "images" / "gateway" / "requirements.txt"
    venv = _venv("gateway", [server, ["-r", str(ours)]], [base, ours])
    _install_mlaas(venv)
    return ImageEnv(path=[str(venv / "bin"), "/usr/bin", "/bin"], user=1000, group=1000, cmd=["dask-gateway-server"])


def upstream_gateway_image() -> ImageEnv:
    """Dask Gateway's own server image (its controller runs it)."""
    server, base = _gateway_server_step()
    # the image's Python is 3.13; on 3.11, aiosignal also needs typing-extensions
    venv = _venv("gateway-server", [[*server, "typing-extensions==4.15.0"]], [base])
    return ImageEnv(path=[str(venv / "bin"), "/usr/bin", "/bin"], user=1000, group=1000, cmd=["dask-gateway-server"])


def proxy_image() -> ImageEnv:
    return ImageEnv(path=[str(REPO / "node_modules" / ".bin"), "/usr/bin", "/bin"], user=65534, group=65534,
                    entrypoint=["configurable-http-proxy"])


def binary_image(directory: Path, entrypoint: list[str], user: int = 65534) -> ImageEnv:
    return ImageEnv(path=[str(directory), "/usr/bin", "/bin"], user=user, group=user, entrypoint=entrypoint)


def xcache_image() -> ImageEnv:
    return ImageEnv(path=["/usr/bin", "/bin"], user=10001, group=10001, workdir="/var/run/xcache",
                    entrypoint=["xrootd"], cmd=["-c", "/etc/xcache/xcache.cfg"])


class Images:
    """Image name (repository, no tag) -> environment, built on first use."""

    def __init__(self, programs: Path):
        self.programs = programs  # tests/cluster/build_images.sh
        self._built: dict[str, ImageEnv] = {}

    def factories(self) -> dict[str, object]:
        return {
            "ghcr.io/mlaas-hub/hub": hub_image,
            "ghcr.io/mlaas-hub/user-cpu": user_image,
            "ghcr.io/mlaas-hub/user-cuda": user_image,  # no GPU here: the CUDA image runs as the CPU one
            "ghcr.io/mlaas-hub/gateway": gateway_image,
            "ghcr.io/mlaas-hub/tracking": tracking_image,
            "ghcr.io/dask/dask-gateway-server": upstream_gateway_image,
            "ghcr.io/mlaas-hub/xcache": xcache_image,
            "quay.io/jupyterhub/configurable-http-proxy": proxy_image,
            "registry.k8s.io/kube-scheduler": lambda: binary_image(self.programs, ["kube-scheduler"]),
            "registry.k8s.io/pause": lambda: binary_image(Path("/bin"), ["sleep", "infinity"]),
            "docker.io/traefik": lambda: binary_image(self.programs, ["traefik"]),
            "traefik": lambda: binary_image(self.programs, ["traefik"]),
        }

    def get(self, image: str) -> ImageEnv:
        repository = image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
        if repository not in self._built:
            factory = self.factories().get(repository)
            if factory is None:
                raise LookupError(f"the test cluster has no environment for the image {image}")
            self._built[repository] = factory()  # type: ignore[operator]
        return self._built[repository]


def image_programs() -> Path:
    """The directory of the images' Go programs (built once, then cached)."""
    out = subprocess.run(["bash", str(HERE / "build_images.sh")], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":  # build every Python image environment ahead of the tests (.ci/run)
    for build in (hub_image, user_image, gateway_image, upstream_gateway_image, tracking_image):
        print(build.__name__, build().path[0], file=sys.stderr)
