"""The example programs, installed as the commands ssmtpd-auth-users and
ssmtpd-deliver-maildir (docs/auth-program.md "The auth program", docs/process-program.md "The process program").

conf/auth-users and conf/deliver-maildir run the same code from a clone that
was not installed.
"""
