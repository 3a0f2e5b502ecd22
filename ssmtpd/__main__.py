import sys

from ssmtpd.cli import main

sys.exit(main())
