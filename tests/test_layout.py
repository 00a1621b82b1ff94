"""The `platform/` folder must never shadow the standard-library module `platform`.

Ray, torch and MLflow import `platform`; with the repo root as cwd (or as Ray's working_dir) a
package of that name on sys.path would break all of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig

from conftest import REPO

STDLIB = sysconfig.get_paths()["stdlib"]
WORKING_DIR_EXCLUDES = [".venv", ".git", "**/__pycache__", "*.egg-info", ".pytest_cache"]


def test_no_init_in_platform_folder():
    assert not os.path.exists(os.path.join(REPO, "platform", "__init__.py"))
    assert os.path.exists(os.path.join(REPO, "platform", "vidray", "__init__.py"))


def test_stdlib_platform_from_repo_root():
    code = "import platform, sys; print(platform.system()); print(platform.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0] == __import__("platform").system()
    assert out[1].startswith(STDLIB)


DRIVER = """
import json, os, sys, ray
ray.init(address=sys.argv[1], runtime_env={"working_dir": sys.argv[2], "excludes": json.loads(sys.argv[3])},
         log_to_driver=False)

@ray.remote
def probe():
    import platform
    import vidray
    return [os.getcwd(), platform.system(), platform.__file__, vidray.__name__]

print(json.dumps(ray.get(probe.remote())))
"""


def test_stdlib_platform_inside_ray_worker_with_repo_working_dir(ray_cluster, tmp_path):
    # working_dir is a job-level option (as with `ray job submit --working-dir .`), so a second
    # driver joins the session's cluster with the repo as its working_dir.
    address = ray_cluster.get_runtime_context().gcs_address
    proc = subprocess.run([sys.executable, "-c", DRIVER, address, REPO, json.dumps(WORKING_DIR_EXCLUDES)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cwd, system, path, vidray_name = json.loads(proc.stdout.strip().splitlines()[-1])
    # The worker really runs inside a copy of the repo, where `platform/` sits on sys.path[0]...
    assert os.path.isdir(os.path.join(cwd, "platform", "vidray"))
    assert not cwd.startswith(REPO)
    # ...and still gets the standard library's module.
    assert system == __import__("platform").system()
    assert path.startswith(STDLIB)
    assert vidray_name == "vidray"


def test_every_subpackage_is_packaged():
    """A wheel (not only an editable install) must carry every package under the mapped folders."""
    import tomllib

    config = tomllib.load(open(os.path.join(REPO, "pyproject.toml"), "rb"))["tool"]["setuptools"]
    listed, found = set(config["packages"]), set()
    for package, folder in config["package-dir"].items():
        for dirpath, _, files in os.walk(os.path.join(REPO, folder)):
            if "__init__.py" in files and "__pycache__" not in dirpath:
                rel = os.path.relpath(dirpath, os.path.join(REPO, folder))
                found.add(package if rel == "." else package + "." + rel.replace(os.sep, "."))
    assert found <= listed, f"not in pyproject's packages: {sorted(found - listed)}"
