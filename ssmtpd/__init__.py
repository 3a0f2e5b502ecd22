"""ssmtpd: a receive-only SMTP submission server."""

__version__ = "0.1.0"
