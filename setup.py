"""Build hook, the metadata is in pyproject.toml: ship ``zclip_dist_autoload.pth`` at the top of site-packages,
where Python's ``site`` runs it at start-up (see ``_zclip_dist_autoload.py``), in wheels and in editable
installs alike."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "zclip_dist_autoload.pth"
PTH_LINE = "import _zclip_dist_autoload\n"


class build_py_with_pth(build_py):
    def run(self) -> None:
        super().run()
        # A wheel is the content of build_lib. An editable wheel (PEP 660) is built from the `install`
        # command's install_lib instead; build_lib is a scratch directory there.
        target = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        os.makedirs(target, exist_ok=True)
        with open(os.path.join(target, PTH_NAME), "w") as f:
            f.write(PTH_LINE)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        return outputs if self.editable_mode else [*outputs, os.path.join(self.build_lib, PTH_NAME)]


setup(cmdclass={"build_py": build_py_with_pth})
