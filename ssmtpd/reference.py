"""The options reference of the documentation (docs/options.md), made from config.OPTIONS.

The page is written from the same table that builds the command line, the
environment variables and the ini keys, so the documentation cannot drift from
them: tests/test_docs.py makes it again and fails when it differs from the file.
After changing an option:

    python3 -m ssmtpd.reference > docs/options.md
"""

import argparse
import re
import sys
from typing import Dict, List, Tuple

from ssmtpd import config

# Where each option is explained at length: the page (and section) of docs/
# that a user reading its entry goes on to.  Every option has one.
MORE: Dict[str, Tuple[str, str]] = {
    "hostname": ("Host name and certificate", "configuration.md#host-name-and-certificate"),
    "bind": ("Configuration", "configuration.md"),
    "port": ("Ports 587 and 465, and root", "deploying.md#ports-587-and-465-and-root"),
    "smtps-port": ("Ports 587 and 465, and root", "deploying.md#ports-587-and-465-and-root"),
    "ssl-cert": ("Host name and certificate", "configuration.md#host-name-and-certificate"),
    "ssl-key": ("Host name and certificate", "configuration.md#host-name-and-certificate"),
    "auth": ("The auth program", "auth-program.md"),
    "process": ("The process program", "process-program.md"),
    "require-tls": ("The dialogue", "dialogue.md"),
    "require-auth": ("The dialogue", "dialogue.md"),
    "max-message-size": ("The dialogue", "dialogue.md"),
    "max-recipients": ("The dialogue", "dialogue.md"),
    "max-connections": ("Limits and abuse", "limits.md"),
    "max-connections-per-ip": ("Limits and abuse", "limits.md"),
    "max-connection-rate-per-ip": ("Limits and abuse", "limits.md"),
    "max-messages-per-user": ("Accounts and limits", "limits.md#accounts-and-limits"),
    "max-recipients-per-user": ("Accounts and limits", "limits.md#accounts-and-limits"),
    "state": ("Shared counts", "limits.md#shared-counts-state"),
    "state-prefix": ("Shared counts", "limits.md#shared-counts-state"),
    "state-timeout": ("Shared counts", "limits.md#shared-counts-state"),
    "max-sessions-per-user": ("Accounts and limits", "limits.md#accounts-and-limits"),
    "timeout": ("The dialogue", "dialogue.md"),
    "data-timeout": ("The dialogue", "dialogue.md"),
    "auth-mechanisms": ("OAuth 2 tokens", "auth-program.md#oauth-2-tokens"),
    "auth-timeout": ("The auth program", "auth-program.md"),
    "auth-failure-delay": ("The dialogue", "dialogue.md"),
    "auth-cache-ttl": ("The auth cache", "auth-program.md#the-auth-cache"),
    "auth-cache-negative-ttl": ("The auth cache", "auth-program.md#the-auth-cache"),
    "process-timeout": ("The process program", "process-program.md"),
    "graceful-timeout": ("Signals", "operations.md#signals"),
    "max-auth-failures-per-ip": ("Limits and abuse", "limits.md"),
    "auth-failure-window": ("Limits and abuse", "limits.md"),
    "max-auth-programs": ("Limits and abuse", "limits.md"),
    "ipv6-prefix-length": ("Limits and abuse", "limits.md"),
    "busy-timeout": ("Limits and abuse", "limits.md"),
    "spool-dir": ("Limits and abuse", "limits.md"),
    "workers": ("Scaling", "scaling.md"),
    "proxy-protocol": ("Many machines behind a load balancer",
                       "scaling.md#many-machines-behind-a-load-balancer"),
    "proxy-trusted": ("Many machines behind a load balancer",
                      "scaling.md#many-machines-behind-a-load-balancer"),
    "metrics-bind": ("Monitoring", "monitoring.md"),
    "user": ("Ports 587 and 465, and root", "deploying.md#ports-587-and-465-and-root"),
    "group": ("Ports 587 and 465, and root", "deploying.md#ports-587-and-465-and-root"),
    "received-header": ("The process program", "process-program.md"),
    "log-level": ("Logging", "logging.md"),
    "log-format": ("Logging", "logging.md"),
}

_DEFAULT_IN_HELP = re.compile(r"\s*\(default: (.*)\)$")

HEAD = """\
# Options

<!-- Made by `python3 -m ssmtpd.reference > docs/options.md` from the table
     of options in ssmtpd/config.py; edit that table, not this file. -->

Every option of the server, in the order of `ssmtpd --help`. Each can be given
on the command line, as an environment variable or as a key of the `[ssmtpd]`
section of the ini file (`-c FILE`), highest first; an ini key may be written
with `-` or `_`. A boolean option is switched off with its `--no-` form on the
command line, and with `false`, `no`, `off` or `0` elsewhere. How the three
places combine, and what a bad value does: [Configuration](configuration.md).
"""


def _number(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def default_and_meaning(opt: config.Option) -> Tuple[str, str]:
    """The default as `ssmtpd --help` shows it, and the help text without it."""
    found = _DEFAULT_IN_HELP.search(opt.help)
    if found:
        return found.group(1), opt.help[:found.start()]
    if opt.kind == "bool":
        return ("on" if opt.default else "off"), opt.help
    if opt.default is None:
        return "off", opt.help
    return f"`{_number(opt.default)}`", opt.help


def _sentence(text: str) -> str:
    text = text.strip()
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def _heading(opt: config.Option) -> str:
    return f"`{opt.flag}` / `--no-{opt.name}`" if opt.kind == "bool" else f"`{opt.flag}`"


def _anchor(heading: str) -> str:
    """The id MkDocs gives a heading (Python-Markdown's toc: word characters,
    spaces and hyphens kept, lower case, each run of spaces and hyphens one hyphen)."""
    text = re.sub(r"[^\w\s-]", "", heading).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def summary() -> List[str]:
    """One row an option, linked to its entry: what a reader scans for."""
    lines = ["| option | environment variable | default |", "|---|---|---|"]
    for opt in config.OPTIONS:
        default, _ = default_and_meaning(opt)
        lines.append(f"| [`{opt.flag}`](#{_anchor(_heading(opt))}) "
                     f"| `{config.ENV_PREFIX}{opt.attr.upper()}` | {default} |")
    return lines + [""]


def option_entry(opt: config.Option) -> List[str]:
    heading = _heading(opt)
    default, meaning = default_and_meaning(opt)
    title, page = MORE[opt.name]
    return [
        f"### {heading}",
        "",
        f"- environment variable: `{config.ENV_PREFIX}{opt.attr.upper()}`",
        f"- ini key: `{opt.name}`",
        f"- default: {default}",
        "",
        f"{_sentence(meaning)} More in [{title}]({page}).",
        "",
    ]


def _command_line_only() -> List[argparse.Action]:
    """The parser's actions that are not in OPTIONS: --config, --example, --try-auth, ..."""
    server = {opt.flag for opt in config.OPTIONS}
    return [action for action in config.build_parser()._actions
            if action.option_strings and not server & set(action.option_strings)]


def command_line_entry(action: argparse.Action) -> List[str]:
    names = " / ".join(f"`{name}`" for name in action.option_strings)
    if action.metavar:
        names += f" `{action.metavar}`"
    elif action.choices:
        names += f" `{'|'.join(action.choices)}`"
    return [f"- {names}: {action.help}" + ("" if action.help.endswith(".") else ".")]


def page() -> str:
    """docs/options.md, whole."""
    lines = [HEAD, "## At a glance", ""] + summary() + ["## Server options", ""]
    for opt in config.OPTIONS:
        lines += option_entry(opt)
    lines += [
        "## Command line only",
        "",
        "These ask one run to do something other than serve, or say where the",
        "configuration is; no environment variable or ini key stands for them",
        "(`SSMTPD_CONFIG` names the ini file too).",
        "",
    ]
    for action in _command_line_only():
        lines += command_line_entry(action)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(page())
