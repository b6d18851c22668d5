"""Every build (wheel, sdist install, editable install) compiles the page catalogs first.

gateway/translations/<language>/LC_MESSAGES/gateway.po -> gateway.mo with Babel's own ``compile_catalog``
command (Babel is a build requirement, not a runtime one): the wheel carries the compiled catalogs, and the
gateway reads them with the standard library's gettext.
"""

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithCatalogs(build_py):
    def run(self) -> None:
        self.run_command("compile_catalog")
        super().run()


setup(
    cmdclass={"build_py": BuildWithCatalogs},
    options={"compile_catalog": {"directory": "gateway/translations", "domain": "gateway"}},
)
