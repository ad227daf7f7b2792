"""Packaging for instructengine. Every setting lives in settings.ini (nbdev's single source); this file only reads it."""
from configparser import ConfigParser
from pathlib import Path
import shlex

import setuptools

cfg = ConfigParser(delimiters=["="])
cfg.read("settings.ini", encoding="utf-8")
cfg = cfg["DEFAULT"]

required = "version description keywords author author_email lib_name user branch license status min_python audience language git_url"
missing = [k for k in required.split() if k not in cfg]
if missing: raise SystemExit(f"settings.ini lacks the settings {missing}")

STATUS = {"1": "Planning", "2": "Pre-Alpha", "3": "Alpha", "4": "Beta", "5": "Production/Stable"}
LICENSE = {"apache2": ("Apache-2.0", "Apache Software License")}
lic_name, lic_classifier = LICENSE.get(cfg["license"].lower(), (cfg["license"], None))
minor = int(cfg["min_python"].split(".")[1])

setuptools.setup(
    name=cfg["lib_name"],
    version=cfg["version"],
    description=cfg["description"],
    keywords=cfg["keywords"],
    author=cfg["author"],
    author_email=cfg["author_email"],
    license=lic_name,
    url=cfg["git_url"],
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    classifiers=[f"Development Status :: {cfg['status']} - {STATUS[cfg['status']]}",
                 f"Intended Audience :: {cfg['audience'].title()}",
                 f"Natural Language :: {cfg['language'].title()}"]
                + [f"Programming Language :: Python :: 3.{m}" for m in range(minor, 14)]
                + ([f"License :: OSI Approved :: {lic_classifier}"] if lic_classifier else []),
    packages=setuptools.find_packages(include=[cfg["lib_name"], cfg["lib_name"] + ".*"]),
    include_package_data=True,
    package_data={cfg["lib_name"]: cfg.get("package_data", "").split()},
    python_requires=">=" + cfg["min_python"],
    # `requirements` may hold quoted markers, so shlex; `dev_requirements` must not contain spaces in a specifier
    install_requires=shlex.split(cfg.get("requirements", "")),
    extras_require={"dev": cfg.get("dev_requirements", "").split()},
    entry_points={"console_scripts": cfg.get("console_scripts", "").split(),
                  "nbdev": [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"]},
    zip_safe=False,
)
