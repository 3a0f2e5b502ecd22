#!/bin/sh
# Benchmark auth program: one fixed account, decided with shell builtins only.
[ "$SSMTPD_USERNAME" = "bench" ] && [ "$SSMTPD_PASSWORD" = "bench-password" ] && exit 0
exit 1
