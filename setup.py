"""What pyproject.toml cannot say: the top-level ``conf/`` ships inside the package as ``adamerge.conf``.

``conf/`` stays the single source of every configuration (the design keeps it at the top of the repository); the
wheel and the sdist map it to ``adamerge/conf`` so an installed ``adamerge`` finds its configs
(``adamerge.methods.configs.CONF_DIR``). Its sub-directories are listed as packages so that every config group
ships (setuptools only copies data files of listed packages).
"""

from setuptools import find_namespace_packages, setup

CONF_PACKAGE = "adamerge.conf"
conf_groups = [f"{CONF_PACKAGE}.{group}" for group in find_namespace_packages(where="conf")]

setup(
    packages=[*find_namespace_packages(include=["adamerge", "adamerge.*"], exclude=["*.__pycache__"]),
              CONF_PACKAGE, *conf_groups],
    package_dir={CONF_PACKAGE: "conf"},  # and so adamerge.conf.<group> -> conf/<group>
)
