"""The example programs, installed as the commands ssmtpd-auth-users and
ssmtpd-deliver-maildir (README "The auth program", "The process program").

conf/auth-users and conf/deliver-maildir run the same code from a clone that
was not installed.
"""
