import re

from setuptools import find_packages, setup

# One version, where the running server reads it (`ssmtpd --version`, the
# start-up line, an upgrade's "upgraded from X to Y").
with open("ssmtpd/__init__.py", encoding="utf-8") as f:
    VERSION = re.search(r'^__version__ = "([^"]+)"$', f.read(), re.M).group(1)

setup(
    name="ssmtpd",
    version=VERSION,
    description="A small SMTP submission server that hands each message to your program",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["ssmtpd", "ssmtpd.*"]),
    # The files `ssmtpd --example NAME` prints: a configuration, the systemd
    # unit, the supervisord section, the fail2ban filter and jail, the token
    # introspection auth program.
    package_data={"ssmtpd.examples": ["*.ini", "*.service", "*.conf", "*.local",
                                      "auth-introspect"]},
    python_requires=">=3.9",
    install_requires=[
        "gevent>=22.10",
        "configargparse>=1.5",
        # Only for the self-signed certificate made when none is configured.
        "cryptography>=3.4",
        # --metrics-bind: the Prometheus text format and its multiprocess mode
        # for --workers, from the Prometheus project's own client library.
        "prometheus_client>=0.16",
    ],
    extras_require={
        # --state (docs/limits.md "Accounts and limits").
        "redis": ["redis>=5"],
        # mkdocs: .ci/run builds the documentation site (docs/, mkdocs.yml) with
        # --strict, so a broken link or a page left out of it fails CI.
        "test": ["pytest>=7", "hypothesis>=6", "aiosmtpd>=1.4", "redis>=5", "mkdocs>=1.6"],
    },
    entry_points={"console_scripts": [
        "ssmtpd=ssmtpd.cli:main",
        # The example programs, so an installed ssmtpd has a working default.
        "ssmtpd-auth-users=ssmtpd.examples.auth_users:main",
        "ssmtpd-deliver-maildir=ssmtpd.examples.deliver_maildir:main",
    ]},
    classifiers=[
        "License :: OSI Approved :: MIT License",
        "Programming Language :: Python :: 3",
        "Topic :: Communications :: Email :: Mail Transport Agents",
    ],
)
