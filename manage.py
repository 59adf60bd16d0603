#!/usr/bin/env python
"""Django's command-line utility for the mediarepo project."""

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mediarepo.settings")
    # Private files (the data directory) for every command, before anything is written;
    # mediarepo.settings sets the same umask. Static files are public: collectstatic
    # makes them readable by all (the container builds them as root for the app user).
    if sys.argv[1:2] == ["collectstatic"]:
        os.environ.setdefault("MEDIAREPO_UMASK", "022")
    os.umask(int(os.environ.get("MEDIAREPO_UMASK") or "077", 8))
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
